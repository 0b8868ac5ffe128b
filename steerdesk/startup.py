"""Can the window start here? Checked before Qt's GUI is imported, so that a missing display or
a missing system library gives one line and exit code 2 instead of Qt's abort (issue 13).

Qt picks its platform plugin from ``QT_QPA_PLATFORM`` or, when that is unset, from the session:
on Linux it tries ``wayland`` first when ``WAYLAND_DISPLAY`` is set and ``xcb`` (X11) when
``DISPLAY`` is set. When every candidate fails it prints a paragraph and aborts (exit 134) and,
for a missing library, names whichever one it looked for first, not the ones that are missing.
Here:

* a platform list that names anything but ``xcb`` (``offscreen``, ``wayland``, ``minimal``,
  ``vnc``, ``xcb;offscreen``...) is Qt's to handle: nothing is checked;
* otherwise, on Linux, with neither ``DISPLAY`` nor ``WAYLAND_DISPLAY``: "no display";
* with ``DISPLAY`` (and no Wayland to try first): ``ldd`` of PySide6's own xcb plugin lists
  every system library it cannot resolve, named with the Debian/Ubuntu package that provides
  it; if none is missing, ``xcb_connect`` must reach the X server.

macOS and Windows are never checked. The whole check costs one ``ldd`` run and one X
connection, about 20 ms. :func:`display_problem` is the pure decision (environment and facts in,
message out) and is what the tests drive with made-up inputs; :func:`check_display` gathers the
facts on this machine.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

EXIT_CODE = 2
HEADLESS = ("set QT_QPA_PLATFORM=offscreen to run the window without a display, "
            "or use the command line (steerdesk-cli --help)")

# The Debian 12 package of every system library in the closure of PySide6 6.11's xcb plugin
# (``ldd .../PySide6/Qt/plugins/platforms/libqxcb.so``, then ``dpkg -S`` on each resolved file;
# the two not installed on the machine it was read on were read from their .deb's file list).
# Ubuntu uses the same names (24.04 renames some to ...t64; apt accepts the old name).
DEBIAN_PACKAGES: dict[str, str] = {
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-util.so.1": "libxcb-util1",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxcb.so.1": "libxcb1",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libX11.so.6": "libx11-6",
    "libXau.so.6": "libxau6",
    "libXdmcp.so.6": "libxdmcp6",
    "libGL.so.1": "libgl1",
    "libGLX.so.0": "libglx0",
    "libGLdispatch.so.0": "libglvnd0",
    "libEGL.so.1": "libegl1",
    "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6",
    "libpng16.so.16": "libpng16-16",
    "libexpat.so.1": "libexpat1",
    "libbrotlidec.so.1": "libbrotli1",
    "libbrotlicommon.so.1": "libbrotli1",
    "libglib-2.0.so.0": "libglib2.0-0",
    "libgthread-2.0.so.0": "libglib2.0-0",
    "libpcre2-8.so.0": "libpcre2-8-0",
    "libdbus-1.so.3": "libdbus-1-3",
    "libsystemd.so.0": "libsystemd0",
    "libz.so.1": "zlib1g",
    "libzstd.so.1": "libzstd1",
    "liblzma.so.5": "liblzma5",
    "liblz4.so.1": "liblz4-1",
    "libbsd.so.0": "libbsd0",
    "libmd.so.0": "libmd0",
    "libcap.so.2": "libcap2",
    "libgcrypt.so.20": "libgcrypt20",
    "libgpg-error.so.0": "libgpg-error0",
    "libstdc++.so.6": "libstdc++6",
    "libgcc_s.so.1": "libgcc-s1",
}

# xcb_connection_has_error() codes (xcb.h).
XCB_ERRORS: dict[int, str] = {
    1: "no X server answers there, or it refused the connection (not authorised?)",
    2: "the X server lacks a required extension",
    3: "out of memory",
    4: "request too long",
    5: "DISPLAY cannot be parsed",
    6: "that screen does not exist on the X server",
    7: "file-descriptor passing failed",
}

_NOT_FOUND = re.compile(r"^\s*(\S+)\s+=>\s+not found\s*$", re.MULTILINE)
_CDLL_MISSING = re.compile(r"^(\S+?): cannot open shared object file")


def requested_platforms(env: Mapping[str, str]) -> list[str] | None:
    """The platform names in ``QT_QPA_PLATFORM`` (``"xcb;offscreen"`` → ``["xcb", "offscreen"]``).

    Options after ``:`` are dropped (``"xcb:foo=1"`` → ``["xcb"]``); unset or empty → ``None``.
    """
    value = env.get("QT_QPA_PLATFORM", "").strip()
    names = [part.split(":", 1)[0].strip().lower() for part in value.split(";")]
    names = [name for name in names if name]
    return names or None


def needs_x11(env: Mapping[str, str], platform: str) -> bool:
    """Whether Qt will start on X11 only, so that the xcb libraries and the X server matter."""
    if not platform.startswith("linux"):
        return False
    platforms = requested_platforms(env)
    if platforms is not None:
        return all(name == "xcb" for name in platforms) and bool(env.get("DISPLAY"))
    return bool(env.get("DISPLAY")) and not env.get("WAYLAND_DISPLAY")


def missing_from_ldd(ldd_output: str) -> list[str]:
    """The sonames ``ldd`` reports as ``=> not found``, each once, in ``ldd``'s order."""
    return list(dict.fromkeys(_NOT_FOUND.findall(ldd_output)))


def install_hint(sonames: Sequence[str]) -> str:
    """``sudo apt-get install ...`` for the sonames with a known Debian package, plus the rest."""
    packages = list(dict.fromkeys(DEBIAN_PACKAGES[s] for s in sonames if s in DEBIAN_PACKAGES))
    unknown = [s for s in sonames if s not in DEBIAN_PACKAGES]
    parts = []
    if packages:
        parts.append(f"on Debian/Ubuntu: sudo apt-get install {' '.join(packages)}")
    if unknown:
        parts.append(f"install the package that provides {', '.join(unknown)}")
    return "; ".join(parts)


def display_problem(env: Mapping[str, str], platform: str, missing_libraries: Sequence[str] = (),
                    x_error: str | None = None) -> str | None:
    """The one-line reason the window cannot start, or ``None`` when Qt should be let to try.

    Pure: ``env`` is the environment, ``platform`` is ``sys.platform``, ``missing_libraries``
    the sonames the xcb plugin cannot resolve, ``x_error`` why the X server refused a
    connection (both only looked at when :func:`needs_x11` holds).
    """
    if not platform.startswith("linux"):
        return None
    platforms = requested_platforms(env)
    if platforms is not None and any(name != "xcb" for name in platforms):
        return None  # offscreen, wayland, a fallback list...: Qt's to try
    if platforms is None and env.get("WAYLAND_DISPLAY"):
        return None  # Qt tries Wayland first, X11 (if DISPLAY) after it
    if not env.get("DISPLAY"):
        if platforms is None:
            return ("steerdesk: error: no display to open the window on (neither DISPLAY nor "
                    f"WAYLAND_DISPLAY is set); {HEADLESS}")
        return f"steerdesk: error: QT_QPA_PLATFORM=xcb but DISPLAY is not set; {HEADLESS}"
    if missing_libraries:
        libs = ", ".join(missing_libraries)
        return (f"steerdesk: error: the window cannot start on X11: Qt's xcb plugin needs {libs}, "
                f"not installed ({install_hint(missing_libraries)}); or {HEADLESS}")
    if x_error:
        return (f"steerdesk: error: cannot connect to the X server DISPLAY={env['DISPLAY']!r}: "
                f"{x_error}; check DISPLAY (and XAUTHORITY), or {HEADLESS}")
    return None


def xcb_plugin() -> Path | None:
    """PySide6's xcb platform plugin, located without importing PySide6 (``None`` if absent)."""
    from importlib.util import find_spec

    spec = find_spec("PySide6")
    for root in (spec.submodule_search_locations or []) if spec else []:
        plugin = Path(root) / "Qt" / "plugins" / "platforms" / "libqxcb.so"
        if plugin.is_file():
            return plugin
    return None


def missing_libraries(plugin: Path, ldd: str = "ldd") -> list[str]:
    """Sonames that ``plugin`` needs, directly or through another library, and cannot resolve.

    Uses ``ldd`` (the dynamic loader's own resolution, honouring ``LD_LIBRARY_PATH``); without
    ``ldd``, loads the plugin with ctypes, which names only the first missing library.
    """
    import subprocess

    try:
        result = subprocess.run([ldd, str(plugin)], check=False, capture_output=True, text=True, timeout=10)
        return missing_from_ldd(result.stdout)
    except (OSError, subprocess.TimeoutExpired):
        pass
    import ctypes

    try:
        ctypes.CDLL(str(plugin))
    except OSError as exc:
        found = _CDLL_MISSING.match(str(exc))
        return [found.group(1)] if found else []
    return []


def x_connection_error(display: str) -> str | None:
    """Why ``xcb_connect`` to ``display`` (e.g. ``":0"``) fails, or ``None`` when it is accepted."""
    import ctypes

    try:
        xcb = ctypes.CDLL("libxcb.so.1")
    except OSError:
        return None  # reported as a missing library, if Qt needs it
    xcb.xcb_connect.restype = ctypes.c_void_p
    xcb.xcb_connect.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
    xcb.xcb_connection_has_error.argtypes = [ctypes.c_void_p]
    xcb.xcb_disconnect.argtypes = [ctypes.c_void_p]
    screen = ctypes.c_int(0)
    conn = xcb.xcb_connect(display.encode(), ctypes.byref(screen))
    try:
        code = int(xcb.xcb_connection_has_error(conn))
    finally:
        xcb.xcb_disconnect(conn)  # safe on an errored connection too
    if code == 0:
        return None
    return f"{XCB_ERRORS.get(code, 'connection failed')} (xcb error {code})"


def check_display(env: Mapping[str, str] | None = None, platform: str | None = None,
                  plugin: Path | None = None) -> str | None:
    """Gather the facts on this machine and return :func:`display_problem`'s verdict."""
    env = os.environ if env is None else env
    platform = sys.platform if platform is None else platform
    if not needs_x11(env, platform):
        return display_problem(env, platform)
    plugin = plugin or xcb_plugin()
    missing = missing_libraries(plugin) if plugin is not None else []
    x_error = None if missing else x_connection_error(env["DISPLAY"])
    return display_problem(env, platform, missing, x_error)


def refuse_without_display() -> int | None:
    """Print the one-line reason and return :data:`EXIT_CODE` if the window cannot start here."""
    problem = check_display()
    if problem is None:
        return None
    print(problem, file=sys.stderr, flush=True)
    return EXIT_CODE
