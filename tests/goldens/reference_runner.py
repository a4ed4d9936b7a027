"""Run the oracle's run_reference.py with torchcrepe preloaded and, optionally, the reference's
chunking constants overridden.

Executed by the oracle venv's python (not ours), from make_goldens.py:

    python reference_runner.py --oracle ORACLE_DIR [--chunking X_PAD X_QUERY X_CENTER X_MAX] \
        -- <run_reference.py arguments>

The reference's `Pipeline` copies x_pad/x_query/x_center/x_max from its `Config` when `VC.get_vc`
builds it, and run_reference.py gets that `Config` from `oracle_common.reference_config()`, so
setting the attributes on what that function returns is enough. run_reference.py writes the
values it ran with into the dump's meta_json ("config"), and make_goldens.py checks them.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit("usage: reference_runner.py --oracle DIR [--chunking 4 ints] -- <run_reference args>")
    split = argv.index("--")
    ap = argparse.ArgumentParser()
    ap.add_argument("--oracle", required=True, help="folder of run_reference.py / oracle_common.py")
    ap.add_argument("--chunking", type=int, nargs=4, metavar=("X_PAD", "X_QUERY", "X_CENTER", "X_MAX"))
    args = ap.parse_args(argv[:split])

    sys.path.insert(0, args.oracle)
    import oracle_common
    import run_reference

    # run_reference.py loads the voice, HuBERT and RMVPE before it seeds, as a warm server has
    # them, but torchcrepe builds its model lazily inside the request, and building it draws
    # from torch's generator, shifting the synthesizer's noise. Load it before the seed too, so
    # that the noise is the plain stream of torch.manual_seed(seed) (load_golden relies on it).
    oracle_common.ensure_torchcrepe_importable()
    import torchcrepe

    torchcrepe.load.model("cpu", "full")  # what the reference's predict(model="full") would load

    if args.chunking:
        build_config = oracle_common.reference_config

        def reference_config():
            cfg = build_config()
            cfg.x_pad, cfg.x_query, cfg.x_center, cfg.x_max = args.chunking
            return cfg

        oracle_common.reference_config = reference_config
    run_reference.main(argv[split + 1:])


if __name__ == "__main__":
    main(sys.argv[1:])
