"""Where the packaged config lives: the one place Hydra's entry point and the key reference find conf/."""
from pathlib import Path


def _conf_dir() -> Path:
    """runner/conf inside an installed wheel; <repo>/conf in a checkout or an editable install."""
    package = Path(__file__).resolve().parent.parent
    for folder in (package / "conf", package.parent / "conf"):
        if (folder / "config.yaml").is_file():
            return folder
    raise FileNotFoundError(f"no conf/config.yaml next to or above {package}")


CONF_DIR = _conf_dir()
