"""The compile gate's Triton overlay venv (``scripts/gpu_compile/overlay.py``) sees what the
calling interpreter sees, its own packages first, whether the caller is a venv or a plain prefix
install (the system Python; a conda environment is one too).

Each test builds small venvs without pip (a fraction of a second each) and asks interpreters
what they would import, without importing torch."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
OVERLAY = ROOT / "scripts" / "gpu_compile" / "overlay.py"

PROBE = textwrap.dedent("""
    import importlib, importlib.util, json, sys
    out = {"path": sys.path, "origin": {}, "value": {}}
    for name in sys.argv[1:]:
        spec = importlib.util.find_spec(name)
        out["origin"][name] = spec.origin if spec else None
        if spec and name.startswith("vp_"):
            out["value"][name] = getattr(importlib.import_module(name), "VALUE", None)
    print(json.dumps(out))
""")


def bin_python(env):
    return str(pathlib.Path(env) / ("Scripts" if os.name == "nt" else "bin") / "python")


def probe(python, *names):
    out = subprocess.run([python, "-c", PROBE, *names], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)


def site_packages(python):
    return subprocess.run([python, "-I", "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()


def make_overlay(parent_python, env):
    """The overlay, made by ``parent_python`` the way the gate makes it; returns its python."""
    own = subprocess.run([parent_python, str(OVERLAY), str(env)], check=True,
                         capture_output=True, text=True).stdout.strip()
    assert pathlib.Path(own).is_dir(), own
    return bin_python(env), own


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def plant_parent_packages(site, extra_dir):
    """What a venv holds that its base interpreter does not: a plain module, a ``.pth`` path
    entry, and a meta-path finder loaded by a ``.pth`` import line (as editable installs do)."""
    site = pathlib.Path(site)
    write(site / "vp_parent_only.py", "VALUE = 'parent'\n")
    write(site / "vp_shadowed.py", "VALUE = 'parent'\n")
    write(extra_dir / "vp_pth_path.py", "VALUE = 'pth path'\n")
    write(site / "vp_paths.pth", f"{extra_dir}\n")
    write(site / "_vp_finder.py", """
        import importlib.abc, importlib.machinery, sys

        class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path=None, target=None):
                if name == "vp_editable":
                    return importlib.machinery.ModuleSpec(name, self, origin="vp-finder")
                return None

            def create_module(self, spec):
                return None

            def exec_module(self, module):
                module.VALUE = "finder"

        sys.meta_path.append(Finder())
    """)
    write(site / "vp_finder.pth", "import _vp_finder\n")


MARKERS = ("vp_parent_only", "vp_pth_path", "vp_editable", "vp_shadowed")


def assert_sees_what_the_parent_sees(parent_python, overlay_python, overlay_site):
    parent = probe(parent_python, "torch", "pytest", *MARKERS)
    overlay = probe(overlay_python, "torch", "pytest", *MARKERS)
    # The overlay's own directory comes before every entry the parent has beyond the stdlib,
    # and after it the parent's sys.path follows in the parent's order.
    stdlib_len = overlay["path"].index(overlay_site)
    assert overlay["path"][:stdlib_len] == parent["path"][:stdlib_len]
    assert overlay["path"][stdlib_len + 1:] == parent["path"][stdlib_len:]
    # The same torch (the caller's view of it, found or not) and the same test runner.
    assert overlay["origin"]["torch"] == parent["origin"]["torch"]
    assert overlay["origin"]["pytest"] == parent["origin"]["pytest"]
    return parent, overlay


def test_overlay_of_a_venv_sees_the_venvs_own_packages(tmp_path):
    """A venv (itself seeing its base's packages) with packages of its own: the overlay made from
    it imports them, .pth entries and finders included, and its own copy of a module wins."""
    parent_env = tmp_path / "parent"
    venv.EnvBuilder(with_pip=False, system_site_packages=True, symlinks=os.name != "nt"
                    ).create(parent_env)
    parent_python = bin_python(parent_env)
    plant_parent_packages(site_packages(parent_python), tmp_path / "extra")
    overlay_python, overlay_site = make_overlay(parent_python, tmp_path / "overlay")
    write(pathlib.Path(overlay_site) / "vp_shadowed.py", "VALUE = 'overlay'\n")

    parent, overlay = assert_sees_what_the_parent_sees(parent_python, overlay_python,
                                                       overlay_site)
    assert parent["value"] == {"vp_parent_only": "parent", "vp_pth_path": "pth path",
                               "vp_editable": "finder", "vp_shadowed": "parent"}
    assert overlay["value"] == dict(parent["value"], vp_shadowed="overlay")


def test_overlay_of_a_plain_prefix_install_sees_its_site_packages(tmp_path):
    """The system Python (``sys.prefix == sys.base_prefix``; a conda environment is the same
    kind of install): the overlay sees the interpreter's own site-packages, the user site when
    it is enabled, and the editable installs there (visprune's, where it was installed so)."""
    base_python = subprocess.run(
        [sys.executable, "-c", "import sys; print(getattr(sys, '_base_executable', '') "
                               "if sys.prefix != sys.base_prefix else sys.executable)"],
        check=True, capture_output=True, text=True).stdout.strip()
    if not base_python or not os.path.exists(base_python):
        pytest.skip("the base interpreter of this venv is not known")
    info = json.loads(subprocess.run(
        [base_python, "-c", "import json, sys; print(json.dumps([sys.prefix, sys.base_prefix]))"],
        check=True, capture_output=True, text=True).stdout)
    assert info[0] == info[1], info
    overlay_python, overlay_site = make_overlay(base_python, tmp_path / "overlay")
    assert_sees_what_the_parent_sees(base_python, overlay_python, overlay_site)
    overlay = probe(overlay_python, "visprune")
    base = probe(base_python, "visprune")
    assert overlay["origin"]["visprune"] == base["origin"]["visprune"]
