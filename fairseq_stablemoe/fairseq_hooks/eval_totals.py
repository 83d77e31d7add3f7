"""The summary lines of fairseq-generate and fairseq-eval-lm as totals over all processes.

On ``W`` processes fairseq shards a split by batches (``ShardedIterator`` pads the shorter shards
with empty filler batches, which the tools skip), and each process prints the summary of its own
shard: a process with no batch at all stops in fairseq-generate's ``num_sentences /
gen_timer.sum`` (``ZeroDivisionError``), and the others print their share as if it were the
split. :mod:`.eval_tools` runs those tools' own code inside :func:`swapped`, which replaces
a few names of the tool's module for the duration of the call (fairseq is not patched):

* the batch loop's iterable is wrapped (:class:`ShardIterator`): it counts the sentences of the
  real batches (as fairseq-generate counts them) and, when the shard is exhausted (the tool's loop
  ends, before its summary), calls :meth:`Totals.end`. That first lets the tool's ``on_end``
  run (the lockstep's :meth:`~.eval_lockstep.Lockstep.finish`: a process with fewer batches
  serves the others' MoE forwards until every process is done), then all-reduces the counts;
* ``StopwatchMeter`` (:meth:`Totals.timer`): the tool's timer; at the end its ``n`` is the total
  over all processes (tokens) and its ``sum`` the longest process's time (they decode side by
  side), so fairseq's own rates are those of the whole split;
* fairseq-generate's scorer (:func:`merge_scorer`): BLEU statistics and WER counts are summed,
  the sentence lists of sacreBLEU, chrF, METEOR and BERTScore are gathered;
* fairseq-generate's ``Translated ...`` line, whose sentence count is a local of fairseq's loop,
  is written from the totals (:class:`SummaryFilter`, a filter on its logger).

Every process prints the totals (as the perplexity of eval-lm does); each sentence is printed only
by the process that decoded it.
"""

import contextlib
import logging
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from fairseq.logging.meters import StopwatchMeter

from ..distributed.expert_parallel import collective_device

logger = logging.getLogger(__name__)


class Totals:
    """One run of a tool on this process: its timer, scorers and sentence count, and their totals."""

    def __init__(self, on_end: Callable[[], None]):
        self.on_end = on_end
        self.world_size = dist.get_world_size()
        self.timers: List[StopwatchMeter] = []
        self.scorers: List[Any] = []
        self.sentences = 0
        self.total_sentences: Optional[int] = None  # set by end()

    def timer(self, *args, **kwargs) -> StopwatchMeter:
        """fairseq's ``StopwatchMeter``, kept for :meth:`end`."""
        meter = StopwatchMeter(*args, **kwargs)
        self.timers.append(meter)
        return meter

    def scorer(self, scorer):
        self.scorers.append(scorer)
        return scorer

    def wrap(self, iterable) -> "ShardIterator":
        return ShardIterator(iterable, self)

    def end(self) -> None:
        """The shard is done: wait for the others (``on_end``), then totals over all processes (collective).

        Idempotent: the second call does nothing.
        """
        if self.total_sentences is not None:
            return
        self.on_end()
        timer = self.timers[0] if self.timers else StopwatchMeter()
        device = collective_device()
        counts = torch.tensor([self.sentences, int(timer.n)], dtype=torch.long, device=device)
        dist.all_reduce(counts)
        longest = torch.tensor([float(timer.sum)], dtype=torch.float64, device=device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        sentences, tokens = counts.tolist()
        self.total_sentences = sentences
        timer.n, timer.sum = tokens, float(longest)
        for scorer in self.scorers:
            merge_scorer(scorer, self.world_size)


class ShardIterator:
    """A tool's batch iterable that counts sentences and calls :meth:`Totals.end` when exhausted.

    Keeps what fairseq's progress bars read from an iterable: ``len()`` and ``n``.
    """

    def __init__(self, iterable, totals: Totals):
        self.iterable = iterable
        self.totals = totals
        self.n = getattr(iterable, "n", 0)

    def __len__(self) -> int:
        return len(self.iterable)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for sample in self.iterable:
            if sample and "net_input" in sample:  # as fairseq-generate counts (fillers are empty)
                self.totals.sentences += int(sample["nsentences"] if "nsentences" in sample else sample["id"].numel())
            yield sample
        self.totals.end()


def merge_scorer(scorer, world_size: int) -> None:
    """Make ``scorer`` (of ``fairseq.scoring``) hold the statistics of every process (collective)."""
    from fairseq.scoring.bleu import Scorer as BleuScorer

    device = collective_device()

    if isinstance(scorer, BleuScorer):  # fairseq's BLEU: counts in a ctypes struct
        fields = [name for name, _ in scorer.stat._fields_]
        values = torch.tensor([int(getattr(scorer.stat, f)) for f in fields], dtype=torch.long, device=device)
        dist.all_reduce(values)
        for name, value in zip(fields, values.tolist()):
            setattr(scorer.stat, name, value)
    elif hasattr(scorer, "distance") and hasattr(scorer, "ref_length"):  # WER
        values = torch.tensor([scorer.distance, scorer.ref_length], dtype=torch.long, device=device)
        dist.all_reduce(values)
        scorer.distance, scorer.ref_length = values.tolist()
    elif isinstance(getattr(scorer, "ref", None), list) and isinstance(getattr(scorer, "pred", None), list):
        everyone: List[Any] = [None] * world_size
        dist.all_gather_object(everyone, (scorer.ref, scorer.pred))
        scorer.ref = [r for refs, _ in everyone for r in refs]
        scorer.pred = [p for _, preds in everyone for p in preds]
    else:
        logger.warning(
            "%s: cannot merge its statistics across processes; its score is this process's shard only", scorer
        )


class _Proxy:
    """A module or object with some attributes replaced; every other attribute is the original's."""

    def __init__(self, original, **replaced):
        self._original = original
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._original, name)


class SummaryFilter(logging.Filter):
    """On fairseq-generate's logger: its ``Translated ...`` line reports the totals."""

    def __init__(self, totals: Totals):
        super().__init__()
        self.totals = totals

    def filter(self, record: logging.LogRecord) -> bool:
        t = self.totals
        if t.total_sentences is not None and str(record.msg).startswith("Translated "):
            timer, seconds = t.timers[0], max(t.timers[0].sum, 1e-9)
            record.msg = (
                f"Translated {t.total_sentences:,} sentences ({timer.n:,} tokens) in {timer.sum:.1f}s "
                f"({t.total_sentences / seconds:.2f} sentences/s, {timer.n / seconds:.2f} tokens/s) "
                f"on {t.world_size} processes"
            )
            record.args = ()
        return True


@contextlib.contextmanager
def swapped(names: Dict[str, Any], **replacements):
    """Replace entries of a module's namespace ``names`` (its ``__dict__``) while the block runs; a name the
    module does not define (a builtin such as ``dict``) is shadowed for its functions, then removed."""
    saved = {k: names[k] for k in replacements if k in names}
    names.update(replacements)
    try:
        yield
    finally:
        for k in replacements:
            if k in saved:
                names[k] = saved[k]
            else:
                del names[k]


@contextlib.contextmanager
def generate_totals(names: Dict[str, Any], totals: Totals):
    """Run ``fairseq_cli.generate`` (namespace ``names``) with the totals in its summary."""
    progress_bar, scoring = names["progress_bar"], names["scoring"]
    summary = SummaryFilter(totals)
    generate_logger = logging.getLogger("fairseq_cli.generate")  # the name generate's _main logs with
    generate_logger.addFilter(summary)
    try:
        with swapped(
            names,
            StopwatchMeter=totals.timer,
            progress_bar=_Proxy(
                progress_bar, progress_bar=lambda itr, *a, **kw: progress_bar.progress_bar(totals.wrap(itr), *a, **kw)
            ),
            scoring=_Proxy(scoring, build_scorer=lambda *a, **kw: totals.scorer(scoring.build_scorer(*a, **kw))),
        ):
            yield
    finally:
        generate_logger.removeFilter(summary)
