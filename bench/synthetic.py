"""Write a synthetic multimodal dataset in RecBole's atomic format (recbole_dppmg.data.synthetic).

python bench/synthetic.py --interactions 1e6                  # dataset/synth-1e6/
python bench/synthetic.py --interactions 2e5 --text-dim 64 --image-dim 128 --name synth-small
python run_dppmg.py -d synth-1e6 --config_files dataset/synth-1e6/synth-1e6.yaml --epochs=5
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from recbole_dppmg.data.synthetic import SyntheticSpec, default_name, write_synthetic
from recbole_dppmg.paths import dataset_root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for spec_field in dataclasses.fields(SyntheticSpec):
        kind = float if spec_field.type in ("float", float) else int
        flag = "--" + spec_field.name.replace("_", "-")
        parser.add_argument(
            flag,
            type=lambda v, kind=kind: kind(float(v)),
            default=spec_field.default,
            help=f"default: {spec_field.default} (see SyntheticSpec)",
        )
    parser.add_argument("--name", default=None, help="folder / dataset name (default: synth-<interactions>)")
    parser.add_argument("--root", default=str(dataset_root()), help="where the dataset folder goes")
    args = vars(parser.parse_args(argv))
    name, root = args.pop("name"), args.pop("root")
    spec = SyntheticSpec(**args)
    folder = write_synthetic(spec, root, name or default_name(spec.interactions))
    print(f"dataset: {folder}")
    print(json.dumps(json.loads((folder / "manifest.json").read_text())["stats"], indent=2))


if __name__ == "__main__":
    main()
