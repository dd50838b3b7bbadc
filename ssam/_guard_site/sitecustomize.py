"""Start-up hook for img2dataset's fetching processes: installs ssam.urlguard (see there).

On ``PYTHONPATH`` only in processes started with ``ssam.urlguard.child_environment()``. If the
guard cannot be installed, the process stops rather than fetch unguarded."""

import os

if os.environ.get("SSAM_URL_GUARD"):
    try:
        from ssam.urlguard import install_from_env

        install_from_env()
    except Exception as e:  # noqa: BLE001 -- any failure here must stop the process, loudly
        import sys

        sys.stderr.write(f"ssam url guard could not be installed, refusing to fetch: {e!r}\n")
        os._exit(70)
