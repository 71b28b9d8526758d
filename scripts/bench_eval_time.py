"""Wall time of the whole perplexity protocol on the float SmolLM2 (the 60 s target of issue 3).

    .venv/bin/python scripts/bench_eval_time.py   # writes the 'eval-time' section
Run it on an otherwise idle machine: the figure is about this machine's 2 cores.
"""

from __future__ import annotations

import os

from benchlib import header, write_section

from jaxq.eval.data import eval_windows
from jaxq.eval.perplexity import perplexity
from jaxq.models import llama
from jaxq.models.default import load_default


def main() -> None:
    params, cfg, tok = load_default()
    windows = eval_windows(tok)
    fn = llama.make_apply_fn(cfg)
    cold = perplexity(fn, params, windows, progress=False)
    warm = perplexity(fn, params, windows, progress=False)
    load = os.getloadavg()[0]
    text = "\n".join([
        "## Eval wall time (issue 3): the whole protocol on 2 CPU cores", "", header(), "",
        f"Float SmolLM2, 32 windows x 512 tokens ({cold.n_tokens} predictions), batch 1: "
        f"perplexity {cold.ppl:.4f}; {cold.seconds:.1f} s including compilation, "
        f"{warm.seconds:.1f} s warm (target: 60 s). Load average after the run: {load:.2f}."])
    print(text)
    write_section("eval-time", text)


if __name__ == "__main__":
    main()
