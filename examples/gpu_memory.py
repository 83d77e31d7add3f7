"""Per-GPU memory of a StableMoE LM in training, from its parameter counts and activations.

Builds the model of ``--arch`` on PyTorch's meta device (no memory, no weights) to count its
parameters, checks the count against the closed-form formula, and prints the model states and
activations per GPU for W GPUs (expert parallelism: N/W experts per GPU, or one expert on W/N
GPUs when W > N) and T tokens per GPU and forward (``--max-tokens``):

    params per GPU  P_W = P_shared + max(N/W, 1) * P_expert
    model states    P_W * B, B = 16 bytes (fp32 and --amp: weights, gradients, Adam's two moments),
                    20 (--fp16: fp16 weights and gradients, an fp32 copy with fp32 gradients, Adam),
                    12 (--memory-efficient-fp16: fp16 weights and gradients, Adam's fp32 moments)
    activations     T * a, with a (bytes per token) = e * (L (8d + f) + K (S (2d + f) + 3d) + 2.5d) + k V,
                    e = 2 (fp16) or 4 (fp32) bytes per element; k V: the fp32 log-probabilities over
                    the V-word vocabulary and, at the start of the backward pass, their gradient and
                    the logits' gradient (k = 10 with --fp16, 12 in fp32)
    all-reduce      with W > 1, fairseq's legacy_ddp gradient buffer: min(2^28, P_W) elements (2 bytes
                    with --fp16, 4 in fp32)
    compute         6 P_active + 6 L s d floating-point operations per token in training (Kaplan et al.,
                    2020), P_active = L (4d^2 + 2df) + K S 2df + V d: the weight matrices one token
                    passes (its expert's only, and the output projection), s tokens per sample

``L`` dense blocks of width ``d`` and FFN ``f``, ``K`` MoE layers of ``S`` sublayers per expert.
The element counts are those of the tensors the model saves for its backward pass, per token, as
counted on the CPU in fp32 with autograd's saved-tensor hooks (8d + f per dense block, 2d + f per
expert sublayer, 3d per MoE layer's routing and dispatch, 2.5d for the embeddings and the final
LayerNorm; no attention matrix is kept: PyTorch's fused attention saves queries, keys, values and
its output). With expert parallelism a GPU's experts run about T tokens when the routing is
balanced, more when it is not.

    python examples/gpu_memory.py --arch stablemoe_lm_base --distributed-world-size 8 16 32 --max-tokens 16384
"""

import argparse
import math
import sys
from typing import Dict, List

import torch

BYTES_PER_PARAM = {"fp32/--amp": 16, "--fp16": 20, "--memory-efficient-fp16": 12}
GIB = 2**30


def build_on_meta(arch: str, vocab: int, tokens_per_sample: int, overrides: Dict[str, int]):
    """The model of ``arch`` with a ``vocab``-word dictionary, its parameters on the meta device."""
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_CONFIG_REGISTRY

    # importing the package registers the model and its architectures
    from fairseq_stablemoe.models.stablemoe_lm import StableMoELanguageModel

    dictionary = Dictionary()  # 4 special symbols
    for i in range(vocab - len(dictionary)):
        dictionary.add_symbol(f"w{i}")
    dictionary.pad_to_multiple_(8)  # as fairseq's language_modeling task does

    class Task:
        source_dictionary = target_dictionary = dictionary

    args = argparse.Namespace(tokens_per_sample=tokens_per_sample, max_target_positions=None, **overrides)
    ARCH_CONFIG_REGISTRY[arch](args)
    with torch.device("meta"):
        model = StableMoELanguageModel.build_model(args, Task())
    return model, args, len(dictionary)


def formula_params(args, vocab: int) -> Dict[str, int]:
    """Shared and per-expert parameter counts in closed form."""
    d, f, L, S, N = (
        args.decoder_embed_dim,
        args.decoder_ffn_embed_dim,
        args.decoder_layers,
        args.moe_sublayers,
        args.num_experts,
    )
    r, K = args.distill_dim, args.moe_layers
    block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d  # attention, FFN, 2 LayerNorms
    embeddings = vocab * d + (args.tokens_per_sample + 2) * d  # tied input/output, learned positions
    routers = K * (N * d + vocab * r + N * r)  # backbone centroids, distilled router's table and centroids
    shared = embeddings + L * block + 2 * d + routers  # + the final LayerNorm
    expert = S * (2 * d * f + f + d + 2 * d)  # S sublayers: LayerNorm, fc1, fc2
    return {"shared": shared, "expert": expert}


def activation_bytes_per_token(args, vocab: int, half: bool) -> float:
    d, f, L, S = args.decoder_embed_dim, args.decoder_ffn_embed_dim, args.decoder_layers, args.moe_sublayers
    elements = L * (8 * d + f) + args.moe_layers * (S * (2 * d + f) + 3 * d) + 2.5 * d
    return (2 if half else 4) * elements + (10 if half else 12) * vocab


def flops_per_token(args, vocab: int, tokens_per_sample: int) -> float:
    d, f, L, S, K = (
        args.decoder_embed_dim,
        args.decoder_ffn_embed_dim,
        args.decoder_layers,
        args.moe_sublayers,
        args.moe_layers,
    )
    active = L * (4 * d * d + 2 * d * f) + K * S * 2 * d * f + vocab * d
    return 6 * active + 6 * L * tokens_per_sample * d


def fmt_params(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="stablemoe_lm_base")
    parser.add_argument(
        "--vocab", type=int, default=50261, help="dictionary size with its 4 specials (GPT-2 BPE: 50261)"
    )
    parser.add_argument("--tokens-per-sample", type=int, default=1024)
    parser.add_argument("--num-experts", type=int, default=None, help="default: the architecture's")
    parser.add_argument("--distributed-world-size", type=int, nargs="+", default=[8, 16, 32], help="W: numbers of GPUs")
    parser.add_argument("--max-tokens", type=int, default=16384, help="T: tokens per GPU and forward")
    parser.add_argument("--tokens-per-update", type=int, default=524288, help="for --update-freq")
    parser.add_argument("--max-update", type=int, default=60000, help="updates, for the total compute")
    parser.add_argument(
        "--sustained-tflops",
        type=float,
        default=300.0,
        help="TFLOP/s one GPU sustains, for the time (default: about 30%% of an H100's or H200's dense bf16 peak)",
    )
    opts = parser.parse_args(argv)

    overrides = {} if opts.num_experts is None else {"num_experts": opts.num_experts}
    model, args, vocab = build_on_meta(opts.arch, opts.vocab, opts.tokens_per_sample, overrides)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    experts = sum(p.numel() for p in params if getattr(p, "expert", False))
    N = args.num_experts
    counted = {"shared": total - experts, "expert": experts // (N * args.moe_layers)}
    formula = formula_params(args, vocab)
    if counted != formula:
        sys.exit(f"the formula {formula} does not match the model's parameters {counted}")
    d, f = args.decoder_embed_dim, args.decoder_ffn_embed_dim
    print(
        f"{opts.arch}: L={args.decoder_layers} dense blocks, d={d}, f={f}, {args.moe_layers} MoE layer(s) of "
        f"N={N} experts x S={args.moe_sublayers} sublayers, V={vocab} (padded), tokens per sample "
        f"{opts.tokens_per_sample}"
    )
    print(
        f"parameters: {total:,} in all; shared P_shared = {counted['shared']:,}; one expert P_expert = "
        f"{counted['expert']:,} (x{N * args.moe_layers} = {experts:,}); counted on the meta device, equal to "
        "the formula"
    )
    act16 = activation_bytes_per_token(args, vocab, half=True)
    act32 = activation_bytes_per_token(args, vocab, half=False)
    T = opts.max_tokens
    print(
        f"activations per token: {act16 / 1024:.0f} KiB with --fp16, {act32 / 1024:.0f} KiB in fp32; "
        f"at T={T} tokens per GPU: {T * act16 / GIB:.1f} GiB (--fp16), {T * act32 / GIB:.1f} GiB (fp32)"
    )
    fpt = flops_per_token(args, vocab, opts.tokens_per_sample)
    per_update = fpt * opts.tokens_per_update
    rate = opts.sustained_tflops * 1e12
    print(
        f"compute: {fpt / 1e9:.3f} GFLOP per token, {per_update / 1e15:.3f} PFLOP per update of "
        f"{opts.tokens_per_update:,} tokens, {per_update * opts.max_update / 1e18:.1f} EFLOP for "
        f"{opts.max_update:,} updates: {per_update * opts.max_update / rate / 3600:,.0f} GPU-hours at "
        f"{opts.sustained_tflops:g} TFLOP/s per GPU"
    )
    print()
    head = ["W GPUs", "experts per GPU", "params per GPU"]
    head += [f"model states {k}" for k in BYTES_PER_PARAM]
    head += ["total --fp16", "total fp32", f"--update-freq for {opts.tokens_per_update:,} tokens"]
    head += [f"s per update at {opts.sustained_tflops:g} TFLOP/s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for W in opts.distributed_world_size:
        if N % W and W % N:
            print(f"| {W} | refused: {N} experts on {W} GPUs | " + " |" * (len(head) - 2))
            continue
        local = N // W if W <= N else 1
        p = counted["shared"] + local * counted["expert"] * args.moe_layers
        states = {k: p * b / GIB for k, b in BYTES_PER_PARAM.items()}
        row = [str(W), f"{local}" + (f" (on {W // N} GPUs)" if W > N else ""), fmt_params(p)]
        row += [f"{v:.1f} GiB" for v in states.values()]
        buffer = min(2**28, p) / GIB if W > 1 else 0.0  # legacy_ddp's all-reduce buffer, in elements
        row += [
            f"{states['--fp16'] + T * act16 / GIB + 2 * buffer:.1f} GiB",
            f"{states['fp32/--amp'] + T * act32 / GIB + 4 * buffer:.1f} GiB",
        ]
        freq = opts.tokens_per_update / (W * T)
        row.append(f"{freq:g}" if freq >= 1 and freq == math.floor(freq) else f"{freq:.2f} (not whole)")
        row.append(f"{per_update / W / rate:.2f}")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
