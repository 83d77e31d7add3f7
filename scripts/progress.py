"""Filter of fairseq-train's ``--log-format simple`` output for scripts/demo.sh: passes the lines a
reader wants (train_inner, validation, the stage boundary, errors) and adds the progress and an
estimate of the time left after each logged update.

    fairseq-train ... 2>&1 | python scripts/progress.py MAX_UPDATE
"""

import re
import sys
import time

KEEP = re.compile(r"train_inner|valid on|stage 2 from|done training|Error|error")


def main() -> None:
    total = int(sys.argv[1])
    start = first = None
    for line in sys.stdin:
        if not KEEP.search(line):
            continue
        sys.stdout.write(line)
        m = re.search(r"num_updates=(\d+)", line)
        if m and "train_inner" in line:
            done, now = int(m.group(1)), time.time()
            if start is None:
                start, first = now, done  # the rate from here on (start-up excluded)
            elif done > first:
                left = (now - start) / (done - first) * (total - done)
                sys.stdout.write(f"    progress: update {done}/{total}, about {left / 60:.1f} min left\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
