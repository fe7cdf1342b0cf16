"""Make a virtual environment that sees what the calling interpreter sees, its own packages first.

    python3 scripts/gpu_compile/overlay.py DIR        # prints DIR's site-packages

The compile gate runs Triton 3.6 (the GPU machine's) beside the installed Triton: it installs
``triton==3.6.0`` into such an overlay (``pip install --target <printed dir>``) and runs the
overlay's python, which must still import the caller's torch and visprune.

``python -m venv --system-site-packages`` is not that: it links the new environment to the *base*
interpreter's site-packages, so from inside a venv it loses the venv's own packages (torch, an
editable visprune).  The overlay here is a plain venv of the same base interpreter whose
site-packages holds one ``.pth`` file.  Its lines run ``site.addsitedir`` on each site directory
of the caller, in the caller's order, after the overlay's own directory: the user site where the
caller enables it, the caller's site-packages and whatever it inherits (a venv made with
``--system-site-packages`` lists the base's too).  ``addsitedir`` processes those directories'
own ``.pth`` files, so editable installs' finders load as they do for the caller.

The caller may be a venv, the system Python or a conda environment.  A conda environment is a
plain prefix install (``sys.prefix == sys.base_prefix``), like the system Python: its packages
are in its own site-packages, which ``site.getsitepackages()`` names, so one code path serves
all three.
"""
from __future__ import annotations

import os
import site
import subprocess
import sys
import venv

PTH = "_caller_site.pth"


def caller_site_dirs() -> list:
    """The site directories of this interpreter, in the order ``site`` added them (the user
    site first where enabled)."""
    dirs = [site.getusersitepackages()] if site.ENABLE_USER_SITE else []
    dirs += site.getsitepackages()
    return [d for d in dirs if os.path.isdir(d)]


def create(env_dir: str) -> str:
    """Create (or recreate) the overlay at ``env_dir``; returns its site-packages."""
    # No pip inside: packages go in with the caller's pip (--target), before or after this.
    venv.EnvBuilder(clear=True, symlinks=os.name != "nt", with_pip=False).create(env_dir)
    python = os.path.join(env_dir, "Scripts" if os.name == "nt" else "bin", "python")
    own = subprocess.run([python, "-I", "-c",
                          "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    # A .pth line that starts with "import" is executed; one line per directory.
    lines = [f"import site; site.addsitedir({d!r})\n" for d in caller_site_dirs()]
    with open(os.path.join(own, PTH), "w") as f:
        f.writelines(lines)
    return own


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1])
    print(create(sys.argv[1]))
