"""llm-compressor's pruning on an HF llama directory: the peer side of scripts/bench_prune.py.

Runs inside the venv of ``scripts/setup_llmcompressor`` (PyTorch CPU + llm-compressor), in its
own process; it imports nothing of jaxq. It reads a float HF directory and a ``.npy`` of
calibration token windows ``[N, L]``, prunes the decoder's linear layers (never the embedding
or lm_head) and writes a model directory of dense float32 safetensors that jaxq loads with
``jaxq.models.hf_loader.load_hf_dir``, so one evaluator scores both sides. A ``result.json``
beside the weights holds the time and the sparsity actually found in the weights.

Methods:

* ``wanda`` / ``sparsegpt``: llm-compressor's ``WandaPruningModifier`` / ``SparseGPTModifier``
  under ``oneshot`` on the given windows (all of them, at their length, unshuffled).
* ``magnitude``: llm-compressor's ``MagnitudePruningModifier`` does nothing under ``oneshot``
  (it is a training-time schedule), so its masks are computed here in torch as it defines
  them: unstructured = the smallest |w| of each layer (one threshold per weight matrix, not per
  output row); N:M = the N largest |w| of each group of M consecutive inputs.
* ``--owl``: the pruning modifier's OWL profile (non-uniform sparsity per decoder block).
* ``--quant w4``: a ``GPTQModifier`` (4-bit integer, asymmetric, groups of 64 along the input)
  after the pruning modifier in the same recipe, llm-compressor's 2:4 + W4 recipe. Its GPTQ
  does not keep the mask: the result reports the fraction of zeros and of N:M groups still
  valid after it. The weights are written dequantized (what the model computes with).

    python scripts/peer_llmcompressor.py --model DIR --calib calib.npy --method sparsegpt \\
        --sparsity 0.5 [--pattern 2:4] [--quant w4] --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

#: The pruning modifiers' targets are the decoder blocks: they prune every Linear inside them
#: (the embedding and lm_head are outside). GPTQ targets the Linears, lm_head ignored.
BLOCKS = ["re:model\\.layers\\.\\d+$"]
IGNORE = ["lm_head"]


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n and "lm_head" not in n}


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    if not pattern:
        return None
    n, _, m = pattern.partition(":")
    if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise SystemExit(f"--pattern {pattern!r}: expected N:M with 0 < N < M, e.g. 2:4")
    return int(n), int(m)


def magnitude_mask(w: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """Keep-mask of ``w [out, in]``: per layer (unstructured) or N-of-M along the input axis."""
    a = w.abs()
    if nm is None:
        k = int(round(sparsity * a.numel()))
        mask = torch.ones_like(a, dtype=torch.bool)
        if k:
            drop = torch.topk(a.flatten(), k, largest=False).indices
            mask.view(-1)[drop] = False
        return mask
    n, m = nm
    if a.shape[1] % m:
        raise SystemExit(f"input width {a.shape[1]} is not a multiple of M={m}")
    g = a.reshape(a.shape[0], -1, m)
    keep = torch.topk(g, n, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(a.shape)


def calibration_dataset(windows: np.ndarray):
    from datasets import Dataset

    ids = windows.astype(np.int64).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})


def recipe(method: str, sparsity: float, pattern: str | None, quant: str | None,
           owl: bool = False) -> list:
    mask = pattern or "0:0"
    common = dict(sparsity=sparsity, mask_structure=mask, targets=BLOCKS, ignore=IGNORE)
    if owl:  # the OWL paper's M = 5, lambda = 0.08 (llm-compressor has no defaults for them)
        common.update(sparsity_profile="owl", owl_m=5, owl_lmbda=0.08)
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        mods = [SparseGPTModifier(**common)]
    else:
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        mods = [WandaPruningModifier(**common)]
    if quant == "w4":
        from llmcompressor.modifiers.quantization import GPTQModifier

        scheme = {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
            "group_size": 64}}}
        mods.append(GPTQModifier(config_groups=scheme, ignore=IGNORE))
    return mods


def sparsity_report(model: torch.nn.Module, nm: tuple[int, int] | None) -> dict:
    """Fraction of exact zeros in the pruned layers and, for N:M, of groups still valid."""
    zeros = total = valid = groups = 0
    for m in decoder_linears(model).values():
        w = m.weight.detach()
        zeros += int((w == 0).sum())
        total += w.numel()
        if nm is not None:
            n, mm = nm
            nz = (w.reshape(w.shape[0], -1, mm) != 0).sum(-1)
            valid += int((nz <= n).sum())
            groups += nz.numel()
    out = {"zero_fraction": zeros / total}
    if nm is not None:
        out["nm_valid_fraction"] = valid / groups
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="float HF directory")
    p.add_argument("--calib", required=True, type=Path, help=".npy of token windows [N, L]")
    p.add_argument("--method", required=True, choices=("wanda", "sparsegpt", "magnitude"))
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", help="N:M, e.g. 2:4 (then the sparsity is N/M's complement)")
    p.add_argument("--quant", choices=("w4",), help="w4: GPTQ 4-bit g64 after the pruning")
    p.add_argument("--owl", action="store_true",
                   help="OWL non-uniform layer sparsities (llm-compressor's sparsity_profile)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threads", type=int, default=int(os.environ.get("JAXQ_PEER_THREADS", 2)))
    args = p.parse_args()
    nm = parse_pattern(args.pattern)
    if nm is not None:
        args.sparsity = 1 - nm[0] / nm[1]
    if args.quant and args.method == "magnitude":
        raise SystemExit("--quant applies to wanda/sparsegpt only")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    os.environ["HF_HUB_OFFLINE"] = "1"  # a local directory only: never reach a model hub
    from transformers import AutoModelForCausalLM

    if not Path(args.model, "config.json").is_file():
        raise SystemExit(f"{args.model}: not a local model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32,
                                                 local_files_only=True)
    model.eval()
    windows = np.load(args.calib)
    t0 = time.perf_counter()
    if args.method == "magnitude":
        with torch.no_grad():
            for m in decoder_linears(model).values():
                m.weight.mul_(magnitude_mask(m.weight, args.sparsity, nm))
    else:
        from llmcompressor import oneshot

        oneshot(model=model, dataset=calibration_dataset(windows),
                recipe=recipe(args.method, args.sparsity, args.pattern, args.quant, args.owl),
                num_calibration_samples=len(windows), max_seq_length=windows.shape[1],
                shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    result = {"seconds": seconds, "method": args.method, "sparsity": args.sparsity,
              "pattern": args.pattern, "quant": args.quant, "owl": args.owl,
              "windows": int(len(windows)),
              "torch": torch.__version__, **sparsity_report(model, nm)}
    try:
        import llmcompressor

        result["llmcompressor"] = llmcompressor.__version__
    except ImportError:
        pass
    write_dense(model, args.model, args.out, result)
    print(json.dumps(result))


def write_dense(model: torch.nn.Module, src: Path, out: Path, result: dict) -> None:
    """The source directory with its decoder linears replaced by the pruned ones, atomically."""
    from safetensors.numpy import load_file, save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    for name, m in decoder_linears(model).items():
        key = f"{name}.weight"
        if key not in tensors:
            raise SystemExit(f"{key}: not in the source directory's weights")
        tensors[key] = m.weight.detach().to(torch.float32).numpy().copy()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "result.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)


if __name__ == "__main__":
    main()
