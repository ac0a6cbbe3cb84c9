"""`common/` is the shared core: it imports nothing from the tracks (`videodpo`,
`llmpost`) and names none of their model classes; model families declare their plans
beside their adapters (docs/design.md section 1)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

COMMON = Path(__file__).resolve().parents[2] / "common"
TRACKS = ("videodpo", "llmpost")
# model class names of the families the tracks support (diffusers / transformers), and
# the tracks' own adapter classes
MODEL_CLASS = re.compile(
    r"\b(?:Wan|CogVideoX|Qwen\d*|Llama|Mistral)\w*"
    r"(?:Model|ForCausalLM|Config|Block|Attention|Processor|Adapter|Pipeline)\b"
)


def layering_violations(source: str, filename: str) -> list[str]:
    """Imports of a track module and model class names anywhere in `source`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module", "__import__"
        ):
            modules = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        for module in modules:
            if module.split(".")[0] in TRACKS:
                found.append(f"{filename}:{node.lineno}: imports {module}")
    for lineno, line in enumerate(source.splitlines(), start=1):
        for match in MODEL_CLASS.finditer(line):
            found.append(f"{filename}:{lineno}: names {match.group(0)}")
    return found


def test_common_imports_no_track_and_names_no_model_class():
    files = sorted(COMMON.rglob("*.py"))
    assert files, f"no sources under {COMMON}"
    violations = [v for path in files for v in layering_violations(path.read_text(), path.name)]
    assert not violations, "\n".join(violations)


def test_the_check_catches_imports_and_class_names():
    source = (
        "import llmpost.dapo\n"
        "def plan(model):\n"
        "    from videodpo.models.wan import WanAdapter\n"
        "    importlib.import_module('videodpo.trainer')\n"
        "    if type(model).__name__ == 'CogVideoXTransformer3DModel':\n"
        "        return 1\n"
        "    return isinstance(model, Qwen3ForCausalLM)\n"
    )
    found = layering_violations(source, "x.py")
    assert any("imports llmpost.dapo" in f for f in found)
    assert any("imports videodpo.models.wan" in f for f in found)
    assert any("imports videodpo.trainer" in f for f in found)
    for name in ("WanAdapter", "CogVideoXTransformer3DModel", "Qwen3ForCausalLM"):
        assert any(name in f for f in found), name
    assert layering_violations("from common.context_parallel import CPGroups\n", "ok.py") == []
