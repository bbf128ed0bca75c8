"""Preparing a device's state directory: its provisioning bundle and, optionally, the
model it ships with (as a factory image would)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from device_agent.state import InstalledModel, StateDir, write_json
from diffs.digest import file_digest


def provision(
    state_dir: Path,
    bundle: dict[str, Any],
    *,
    device_id: str | None = None,
    tags: dict[str, str] | None = None,
    initial_model: Path | None = None,
    model_name: str | None = None,
    initial_version: int | None = None,
) -> StateDir:
    state = StateDir(state_dir)
    content = dict(bundle)
    if device_id is not None:
        content["device_id"] = device_id
    if tags:
        content["tags"] = tags
    write_json(state.bundle, content)
    if initial_model is not None:
        if model_name is None:
            raise ValueError("an initial model needs its model name")
        digest = file_digest(initial_model)
        target = state.model_file(digest)
        shutil.copyfile(initial_model, target)
        state.set_installed(InstalledModel(model_name, initial_version, digest, target.name))
    return state
