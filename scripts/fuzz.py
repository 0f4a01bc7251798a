"""The long fuzz run (RELIABILITY.md): a gateway and two pools in process on a fresh tiny model, then N
malformed or hostile calls per target; prints the status codes each target got and whether the services
still serve and answer exactly. Usage: .venv/bin/python scripts/fuzz.py [--examples 2500]"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.simplefilter("ignore")

from services.cli.gateway_client import GatewayClient  # noqa: E402
from services.format.config import ModelConfig  # noqa: E402
from services.format.model_writer import write_random_model  # noqa: E402
from services.format.presets import preset_config  # noqa: E402
from services.gateway.engine import Engine  # noqa: E402
from services.gateway.sampling import SamplingParams  # noqa: E402
from tests.fuzz_calls import ACCEPTABLE, fuzz_gateway, fuzz_pool  # noqa: E402
from tests.inprocess_deployment import InProcessDeployment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--examples", type=int, default=2500, help="calls per target and kind")
    args = ap.parse_args()
    model = Path(tempfile.mkdtemp()) / "tiny"
    write_random_model(model, preset_config("tiny"), seed=0)
    cfg = ModelConfig.from_file(model)
    dep = InProcessDeployment(model, dispatch_dtype="fp32")
    failed = False
    try:
        for name, run in [
            (
                "pool Forward",
                lambda: fuzz_pool(
                    dep.pool_addresses[0], args.examples, cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts
                ),
            ),
            ("gateway Generate+Score", lambda: fuzz_gateway(dep.gateway, args.examples)),
        ]:
            started = time.monotonic()
            codes = run()
            bad = {c.name: n for c, n in codes.items() if c not in ACCEPTABLE}
            failed |= bool(bad)
            print(
                f"{name}: {sum(codes.values())} calls in {time.monotonic() - started:.1f} s: "
                + ", ".join(f"{c.name} {n}" for c, n in codes.most_common())
                + (f"  UNACCEPTABLE {bad}" if bad else "")
            )
        prompt = [5, 17, 300, 42]
        got = GatewayClient(dep.gateway).generate(None, prompt, max_tokens=16, ignore_eos=True)["token_ids"]
        want = Engine.from_dir(model).generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True))[0].token_ids
        blocks = dep.runtime.core.cache
        print(
            f"afterwards: valid request exact: {got == want}; "
            f"cache blocks free {blocks.free_blocks}/{blocks.num_blocks}"
        )
        failed |= got != want
    finally:
        dep.close()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
