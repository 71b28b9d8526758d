"""Peak memory of jaxq's commands: compress (in memory and ``--stream``), eval and export on
SmolLM2, and a synthetic model streamed; prints a markdown table (command, machine, date, load,
peak RSS per run).

Each run is a child process; its peak resident set is the kernel's ``ru_maxrss`` for that one
child (``os.wait4``), so nothing polls and nothing is missed between samples. The synthetic
model (:func:`write_synthetic_llama`) is a random Llama HF directory written one tensor at a
time, one safetensors shard per block, so writing it needs no more memory than streaming it.

    python scripts/bench_memory.py                       # SmolLM2 runs + a 1B synthetic model
    python scripts/bench_memory.py --synthetic-only --layers 22 --work /tmp/bm
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

#: A Llama of about 1.1B parameters (TinyLlama-1.1B's shape, vocabulary 32000).
CONFIG_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                 num_heads=32, num_kv_heads=4, head_dim=64)


def write_synthetic_llama(d: str | os.PathLike, *, vocab_size: int, hidden_size: int,
                          intermediate_size: int, num_layers: int, num_heads: int,
                          num_kv_heads: int, head_dim: int, dtype: str = "float32",
                          tie_word_embeddings: bool = False, seed: int = 0) -> int:
    """A random Llama HF directory (config.json, a sharded safetensors index), written one
    tensor at a time; returns the number of parameters."""
    import ml_dtypes
    from safetensors.numpy import save_file

    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_params = 0
    weight_map: dict[str, str] = {}

    def shard(name: str, shapes: dict[str, tuple[int, ...]]) -> None:
        nonlocal n_params
        tensors = {}
        for key, shape in shapes.items():
            if key.endswith("norm.weight"):
                x = 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
            else:
                x = 0.02 * rng.standard_normal(shape, np.float32)
            tensors[key] = x.astype(np_dtype)
            n_params += int(np.prod(shape))
        save_file(tensors, str(d / name))
        weight_map.update(dict.fromkeys(tensors, name))

    h, f, hd = hidden_size, intermediate_size, head_dim
    shard("embed.safetensors", {"model.embed_tokens.weight": (vocab_size, h)})
    for i in range(num_layers):
        pre = f"model.layers.{i}."
        shard(f"layer-{i:05d}.safetensors", {
            pre + "self_attn.q_proj.weight": (num_heads * hd, h),
            pre + "self_attn.k_proj.weight": (num_kv_heads * hd, h),
            pre + "self_attn.v_proj.weight": (num_kv_heads * hd, h),
            pre + "self_attn.o_proj.weight": (h, num_heads * hd),
            pre + "mlp.gate_proj.weight": (f, h),
            pre + "mlp.up_proj.weight": (f, h),
            pre + "mlp.down_proj.weight": (h, f),
            pre + "input_layernorm.weight": (h,),
            pre + "post_attention_layernorm.weight": (h,)})
    head = {"model.norm.weight": (h,)}
    if not tie_word_embeddings:
        head["lm_head.weight"] = (vocab_size, h)
    shard("head.safetensors", head)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab_size,
        "hidden_size": h, "intermediate_size": f, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "head_dim": hd, "tie_word_embeddings": tie_word_embeddings, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "torch_dtype": dtype}))
    return n_params


def peak_rss(argv: list[str], timeout: float | None = None) -> tuple[int, float, int]:
    """``(peak resident bytes, wall seconds, exit status)`` of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode:
        print(f"{' '.join(argv)} failed ({proc.returncode}):\n{err[-2000:]}", file=sys.stderr)
    return usage.ru_maxrss * 1024, time.perf_counter() - t0, proc.returncode


def jaxq(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from jaxq.cli import main; "
            "sys.exit(main(sys.argv[1:]))", *args]


def machine() -> str:
    cpus = os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {cpus} CPUs, {mem:.0f} GiB, {platform.system()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", help="scratch directory (default: a temporary one, removed)")
    ap.add_argument("--synthetic-only", action="store_true", help="skip the SmolLM2 runs")
    ap.add_argument("--smollm-only", action="store_true", help="skip the synthetic model")
    ap.add_argument("--layers", type=int, default=CONFIG_1B["num_layers"],
                    help="blocks of the synthetic model (22: about 1.1B parameters)")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_memory-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("JAXQ_CACHE_DIR", str(work / "cache"))
    rows: list[tuple[str, str, int, float]] = []

    def measure(label: str, argv: list[str], note: str = "") -> None:
        rss, sec, rc = peak_rss(argv)
        rows.append((label, note if rc == 0 else f"FAILED (exit {rc})", rss, sec))
        print(f"{label}: {rss / 2**20:.0f} MiB, {sec:.0f} s", file=sys.stderr)

    measure("python -c 'import jaxq.cli' (baseline)",
            [sys.executable, "-c",
             "import jax.numpy as jnp, jaxq.cli; jnp.ones(3).block_until_ready()"])
    try:
        if not args.synthetic_only:
            for recipe in ("w4-g64", "gptq-w4-g64"):
                out = work / f"smollm-{recipe}"
                measure(f"jaxq compress default --recipe {recipe} --no-eval",
                        jaxq("compress", "default", "--recipe", recipe, "--out", str(out),
                             "--no-eval", "--json"))
                shutil.rmtree(out, ignore_errors=True)
                measure(f"jaxq compress default --recipe {recipe} --stream",
                        jaxq("compress", "default", "--recipe", recipe, "--out", str(out),
                             "--stream", "--json"))
            out = work / "smollm-w4-g64"
            measure("jaxq eval OUT (w4-g64, 32 windows)", jaxq("eval", str(out), "--json"))
            measure("jaxq export OUT --to mlx (w4-g64)",
                    jaxq("export", str(out), "--to", "mlx", "--out", str(work / "mlx"),
                         "--json"))
        if not args.smollm_only:
            cfg = {**CONFIG_1B, "num_layers": args.layers}
            src = work / "synthetic"
            n = write_synthetic_llama(src, **cfg, dtype=args.dtype)
            size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
            note = (f"{n / 1e9:.2f}B params, {size / 2**30:.2f} GiB {args.dtype} on disk, "
                    f"{n * 4 / 2**30:.2f} GiB at float32")
            measure("jaxq compress SYNTHETIC --recipe w4-g64 --stream",
                    jaxq("compress", str(src), "--recipe", "w4-g64", "--out",
                         str(work / "synthetic-w4"), "--stream", "--json"), note)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    text = "\n".join([
        "## Peak memory (issue 18): compress, eval, export; streaming a model larger than "
        "memory", "",
        f"Command: `python scripts/bench_memory.py {' '.join(sys.argv[1:])}`".rstrip() + "  ",
        f"Machine: {machine()}  ",
        f"Date: {now} UTC; load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
        "(times are indicative; the memory figures do not depend on load)", "",
        "Peak RSS is the kernel's `ru_maxrss` of each command run as a child process.", "",
        "| command | peak RSS (MiB) | wall s | note |", "|---|---:|---:|---|",
        *[f"| `{label}` | {rss / 2**20:.0f} | {sec:.0f} | {note} |"
          for label, note, rss, sec in rows]])
    print(text)
    if not args.no_write:
        sys.path.insert(0, str(ROOT / "scripts"))
        import benchlib

        benchlib.write_section("memory", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
