"""Export scikit-learn's breast-cancer table (569 tumours, 30 numeric features) to a CSV file.

    pip install "backward-lab[examples]"        # scikit-learn, an optional extra
    python -m runner.experiments.examples.breast_cancer breast_cancer.csv

The target column `malignant` is 1 for a malignant tumour (scikit-learn's `target` is 1 for
benign). Each feature is standardised (zero mean, unit variance), the preprocessing any user
does before plain SGD: the raw features span 1e-3 to 4e3.
"""
import argparse
import sys
from pathlib import Path


def export(path: Path) -> Path:
    from sklearn.datasets import load_breast_cancer

    table = load_breast_cancer(as_frame=True).frame
    features = table.drop(columns="target")
    table = (features - features.mean()) / features.std()
    table["malignant"] = 1 - load_breast_cancer(as_frame=True).frame["target"]
    table.to_csv(path, index=False)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.experiments.examples.breast_cancer",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("breast_cancer.csv"))
    args = parser.parse_args(argv)
    try:
        written = export(args.out)
    except ImportError:
        print("error: scikit-learn is not installed: pip install scikit-learn (the examples extra)", file=sys.stderr)
        return 2
    print(f"wrote {written}: 569 rows, 30 standardised features, target column 'malignant'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
