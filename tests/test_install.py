"""A fresh install works: no module of ours shadows an installed package or the standard library, nor is shadowed.

A script's folder is the first entry of sys.path, so a top-level `kernels.py` here was what transformers found when
it imported the hub's `kernels` package (a dependency of transformers 5.25): every script died on import. These
tests read the names off the installed distributions and the standard library, so a new dependency that claims
one of our names fails here, not on a user's first run."""

import importlib.metadata
import os
import subprocess
import sys

from conftest import ROOT

# The folders whose modules are importable by their bare names: the root (scripts run from it), tests/ (pytest puts
# it first on sys.path) and bench/ (its scripts run from it).
FOLDERS = ("", "tests", "bench")


def our_module_names(root: str = ROOT) -> dict[str, str]:
    """{import name: path} of every top-level module a bare `import NAME` can find in the project's folders."""
    names = {}
    for folder in FOLDERS:
        where = os.path.join(root, folder)
        for entry in sorted(os.listdir(where)) if os.path.isdir(where) else []:
            path = os.path.join(folder, entry)
            if entry.endswith(".py"):
                names[entry[:-3]] = path
            elif os.path.isfile(os.path.join(where, entry, "__init__.py")):
                names[entry] = path
    return names


def clashes(root: str = ROOT) -> list[str]:
    """One line per module of ours whose import name an installed distribution or the standard library also owns."""
    installed = importlib.metadata.packages_distributions()  # {top-level import name: [distributions]}
    found = []
    for name, path in our_module_names(root).items():
        if name in installed:
            found.append(f"{path} shadows (or is shadowed by) the installed {', '.join(installed[name])}")
        if name in sys.stdlib_module_names:
            found.append(f"{path} shadows the standard library's {name}")
    return found


def test_no_module_of_ours_shares_a_name_with_an_installed_package_or_the_standard_library():
    assert clashes() == []


def test_the_check_catches_a_clash(tmp_path):
    """The check sees what it is for: a file named like a requirement's module (tqdm), like the standard library's
    (token), or, where the hub's `kernels` is installed (transformers 5.25 requires it), like that one."""
    for name in ("tqdm.py", "token.py", "kernels.py", "grpo.py"):
        (tmp_path / name).write_text("")
    found = clashes(str(tmp_path))
    assert any(line.startswith("tqdm.py shadows") for line in found), found
    assert any(line.startswith("token.py shadows the standard library") for line in found), found
    if "kernels" in importlib.metadata.packages_distributions():
        assert any(line.startswith("kernels.py shadows") for line in found), found
    assert not any(line.startswith("grpo.py") for line in found), found


def test_transformers_model_code_imports_with_our_folder_first_on_the_path():
    """As a script sees it (`python grpo.py`: our folder first on sys.path), transformers' hub-kernel integration
    and a model built through AutoModelForCausalLM import and run. With kernels.py back at the root and the hub's
    `kernels` installed, this fails with transformers' ImportError."""
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import transformers.integrations.hub_kernels\n"
            "from transformers import AutoModelForCausalLM, Qwen2Config\n"
            "import rl_kernels, rl_runs, toy_world, grpo, ppo, sft, rlhf_reward_model, r1_pipeline\n"
            "config = Qwen2Config(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,\n"
            "                     num_attention_heads=1, num_key_value_heads=1)\n"
            "model = AutoModelForCausalLM.from_config(config)\n"
            "print(type(model).__name__, model(input_ids=__import__('torch').tensor([[1, 2]])).logits.shape)\n")
    done = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Qwen2ForCausalLM torch.Size([1, 2, 32])" in done.stdout


def test_the_floors_file_pins_exactly_the_floors_of_requirements_txt():
    """.ci/floors.txt (what the README's floor run installs) names every requirement at its floor, so the versions
    the README says the suite passed with cannot drift from requirements.txt."""
    from packaging.version import Version

    def entries(name, sep):
        lines = open(os.path.join(ROOT, name)).read().splitlines()
        pairs = [line.split("#")[0].strip().split(sep) for line in lines if line.split("#")[0].strip()]
        return {package.split("[")[0].strip().lower(): Version(version) for package, version in pairs}

    assert entries(".ci/floors.txt", "==") == entries("requirements.txt", ">=")


def test_imports_only_go_down_the_house_plan():
    """The import graph of ../shared/DESIGN.md: sandbox and rl_kernels import nothing of ours; rl_runs only the
    engine; rlvr_rewards the engine and the sandbox; toy_world those; every algorithm file the floors below and no
    other algorithm file (ppo.py may score with the reward model); only r1_pipeline.py imports the scripts. Any
    import counts, inside a function too."""
    import ast

    ground = {"sandbox": set(), "rl_kernels": set()}
    allowed = {**ground, "rl_runs": {"rl_kernels"}, "rlvr_rewards": {"rl_kernels", "sandbox"},
               "toy_world": {"rl_kernels", "rlvr_rewards", "sandbox"}}
    floors = {"rl_kernels", "rl_runs", "rlvr_rewards", "sandbox", "toy_world"}
    allowed.update({name: floors for name in ("sft", "rlhf_reward_model", "grpo")})
    allowed["ppo"] = floors | {"rlhf_reward_model"}
    allowed["r1_pipeline"] = floors | {"sft", "rlhf_reward_model", "grpo", "ppo"}
    ours = {os.path.splitext(f)[0] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert ours == set(allowed), ours ^ set(allowed)
    for name in sorted(ours):
        tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module and not node.level}
        assert imported & ours <= allowed[name], (name, sorted(imported & ours - allowed[name]))
