"""Config files and flags -> one validated options dict, shared by `memento train` and `memento rl`.

Precedence is file < flags (a flag counts only when given) and the block-masking flags merge into
the file's `masking` mapping rather than replacing it. Unknown keys are errors, so a typo never
trains with a default. No torch here: argument errors must stay fast.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict (validated later by the config's `from_dict`)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not valid text (byte {exc.start} is not UTF-8); expected YAML or JSON"
        ) from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise different error types
        raise ValueError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option -> value at the top level")
    return data


def parse_masking(value: str) -> dict[str, Any]:
    """`--masking-config`: inline JSON or a path to a JSON/YAML file."""
    if not value.lstrip().startswith("{") and Path(value).is_file():
        return load_config_file(value)
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--masking-config is neither a file nor valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("--masking-config must be a JSON object of block-masking options")
    return data


def masking_options(
    masking_config: str | None, keep_last_n_blocks: int | None, mask_delimiters: bool | None
) -> dict[str, Any]:
    """The Stage-2 mask flags as one dict: `--masking-config` first, the two flags over it."""
    masking = parse_masking(masking_config) if masking_config else {}
    if keep_last_n_blocks is not None:
        masking["keep_last_n_blocks"] = keep_last_n_blocks
    if mask_delimiters is not None:
        masking["mask_delimiters"] = mask_delimiters
    return masking


def merge_options(config_file: Path | None, flags: dict[str, Any], masking: dict[str, Any]) -> dict[str, Any]:
    """File < flags given (None = not given); masking flags merge into the file's `masking`."""
    values = load_config_file(config_file) if config_file else {}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    values.update({k: v for k, v in flags.items() if v is not None})
    if masking:
        values["masking"] = {**(values.get("masking") or {}), **masking}
    return values


def options_from_dict(cls: type[T], values: dict[str, Any], what: str, required: tuple[str, ...]) -> T:
    """`cls(**values)` for a dataclass config, with `-`/`_` keys, unknown and missing keys refused."""
    known = {f.name for f in fields(cls)}
    normalized = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(normalized) - known)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; valid options: {sorted(known)}")
    missing = sorted(n for n in required if normalized.get(n) in (None, ""))
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise ValueError(f"missing required option(s) {missing}: pass {flags} or set them in --config")
    return cls(**normalized)
