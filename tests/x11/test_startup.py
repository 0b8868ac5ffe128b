"""Start-up without a usable display (issue 13): one line and exit 2, never Qt's abort.

The decision is a pure function (:func:`steerdesk.startup.display_problem`) driven here with
made-up environments and facts; the facts themselves (``ldd`` of a plugin, an X connection) are
checked on a real, deliberately broken copy of PySide6's xcb plugin; the entry point is run as
a user runs it. None of this needs Xvfb.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from x11_helpers import clean_env

from steerdesk import startup
from steerdesk.startup import (
    display_problem,
    missing_from_ldd,
    needs_x11,
    requested_platforms,
)

ROOT = Path(__file__).resolve().parents[2]
LINUX = "linux"

# Real ldd output for PySide6 6.11.3's libqxcb.so on a Debian 12 machine without
# libxcb-icccm4 and libxcb-keysyms1 (the case), abridged.
LDD_MISSING = """\
\tlinux-vdso.so.1 (0x00007f0784544000)
\tlibQt6XcbQpa.so.6 => /venv/PySide6/Qt/plugins/platforms/../../lib/libQt6XcbQpa.so.6 (0x00007f0784480000)
\tlibGL.so.1 => /lib/x86_64-linux-gnu/libGL.so.1 (0x00007f0783e83000)
\tlibxcb-cursor.so.0 => /lib/x86_64-linux-gnu/libxcb-cursor.so.0 (0x00007f0784473000)
\tlibxcb-icccm.so.4 => not found
\tlibxcb-util.so.1 => /lib/x86_64-linux-gnu/libxcb-util.so.1 (0x00007f078446b000)
\tlibxcb-keysyms.so.1 => not found
\tlibxcb-icccm.so.4 => not found
\tlibxcb-keysyms.so.1 => not found
\t/lib64/ld-linux-x86-64.so.2 (0x00007f078454d000)
"""


def one_line(message: str | None) -> str:
    assert message is not None
    assert "\n" not in message and message.startswith("steerdesk: error: "), message
    return message


# ---------------------------------------------------------------------------- the pure decision


def test_platform_list_parsing() -> None:
    assert requested_platforms({}) is None
    assert requested_platforms({"QT_QPA_PLATFORM": "  "}) is None
    assert requested_platforms({"QT_QPA_PLATFORM": "xcb"}) == ["xcb"]
    assert requested_platforms({"QT_QPA_PLATFORM": "wayland;xcb"}) == ["wayland", "xcb"]
    assert requested_platforms({"QT_QPA_PLATFORM": "offscreen:fontengine=freetype"}) == ["offscreen"]


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_macos_and_windows_are_never_checked(platform: str) -> None:
    assert not needs_x11({"DISPLAY": ":0"}, platform)
    assert display_problem({}, platform, ["libxcb-icccm.so.4"], "refused") is None


@pytest.mark.parametrize("value", ["offscreen", "wayland", "minimal", "vnc", "eglfs", "xcb;offscreen",
                                   "wayland;xcb", "offscreen:fontengine=freetype"])
def test_a_platform_other_than_xcb_is_left_to_qt(value: str) -> None:
    env = {"QT_QPA_PLATFORM": value}
    assert not needs_x11({**env, "DISPLAY": ":0"}, LINUX)
    assert display_problem(env, LINUX, ["libxcb-icccm.so.4"], "refused") is None


def test_no_display_at_all() -> None:
    message = one_line(display_problem({}, LINUX))
    assert "no display" in message and "DISPLAY" in message and "WAYLAND_DISPLAY" in message
    assert "QT_QPA_PLATFORM=offscreen" in message and "steerdesk-cli" in message
    assert not needs_x11({}, LINUX)


def test_xcb_forced_without_display() -> None:
    message = one_line(display_problem({"QT_QPA_PLATFORM": "xcb", "WAYLAND_DISPLAY": "wayland-0"}, LINUX))
    assert "QT_QPA_PLATFORM=xcb" in message and "DISPLAY is not set" in message


def test_wayland_session_is_left_to_qt_even_with_broken_xcb() -> None:
    env = {"WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":0"}  # Qt tries Wayland first
    assert not needs_x11(env, LINUX)
    assert display_problem(env, LINUX, ["libxcb-icccm.so.4"], "refused") is None
    assert display_problem({"WAYLAND_DISPLAY": "wayland-0"}, LINUX) is None


def test_xcb_forced_in_a_wayland_session_is_checked() -> None:
    env = {"QT_QPA_PLATFORM": "xcb", "WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":0"}
    assert needs_x11(env, LINUX)
    assert "libxcb-icccm4" in one_line(display_problem(env, LINUX, ["libxcb-icccm.so.4"]))


def test_missing_libraries_are_named_with_their_debian_packages() -> None:
    missing = missing_from_ldd(LDD_MISSING)
    assert missing == ["libxcb-icccm.so.4", "libxcb-keysyms.so.1"]  # each once, ldd's order
    message = one_line(display_problem({"DISPLAY": ":0"}, LINUX, missing))
    assert "libxcb-icccm.so.4, libxcb-keysyms.so.1" in message
    assert "sudo apt-get install libxcb-icccm4 libxcb-keysyms1" in message
    assert "libxcb-cursor" not in message  # what Qt's own message wrongly names
    assert "QT_QPA_PLATFORM=offscreen" in message


def test_unknown_and_shared_packages() -> None:
    message = one_line(display_problem({"DISPLAY": ":0"}, LINUX,
                                       ["libglib-2.0.so.0", "libgthread-2.0.so.0", "libfoo.so.3"]))
    assert "sudo apt-get install libglib2.0-0;" in message  # one package for both sonames
    assert "install the package that provides libfoo.so.3" in message


def test_x_server_refusing_is_named_after_libraries() -> None:
    env = {"DISPLAY": ":7"}
    message = one_line(display_problem(env, LINUX, [], "no X server answers there (xcb error 1)"))
    assert "DISPLAY=':7'" in message and "xcb error 1" in message and "XAUTHORITY" in message
    # Libraries first: the X connection is not even tried when the plugin cannot load.
    assert "libxcb-keysyms1" in one_line(display_problem(env, LINUX, ["libxcb-keysyms.so.1"], "refused"))
    assert display_problem(env, LINUX, [], None) is None


# ---------------------------------------------------------------------------- facts on this machine


@pytest.fixture(scope="module")
def plugin() -> Path:
    found = startup.xcb_plugin()
    if found is None:
        pytest.skip("this PySide6 has no xcb platform plugin")
    return found


@pytest.fixture
def broken_plugin(plugin: Path, tmp_path: Path) -> Path:
    """A copy of the real xcb plugin whose libxcb-keysyms.so.1 dependency became .so.9 (absent).

    Laid out as plugins/platforms/ next to a link to the real Qt lib folder, so its RUNPATH
    ($ORIGIN/../../lib) still finds Qt: only the renamed library is missing.
    """
    data = plugin.read_bytes()
    old, new = b"libxcb-keysyms.so.1\0", b"libxcb-keysyms.so.9\0"
    assert data.count(old) >= 1, "the xcb plugin no longer links libxcb-keysyms.so.1 directly"
    folder = tmp_path / "Qt" / "plugins" / "platforms"
    folder.mkdir(parents=True)
    (tmp_path / "Qt" / "lib").symlink_to(plugin.parents[2] / "lib", target_is_directory=True)
    copy = folder / plugin.name
    copy.write_bytes(data.replace(old, new))
    return copy


@pytest.mark.skipif(shutil.which("ldd") is None, reason="no ldd on this machine")
def test_ldd_of_a_broken_plugin_names_the_missing_library(plugin: Path, broken_plugin: Path) -> None:
    already = set(startup.missing_libraries(plugin))
    missing = startup.missing_libraries(broken_plugin)
    assert "libxcb-keysyms.so.9" in missing
    assert set(missing) - already == {"libxcb-keysyms.so.9"}
    message = one_line(display_problem({"DISPLAY": ":0"}, LINUX, missing))
    assert "libxcb-keysyms.so.9" in message


def test_without_ldd_the_loader_names_the_first_missing_library(plugin: Path, broken_plugin: Path) -> None:
    if startup.missing_libraries(plugin):
        pytest.skip("the real plugin already misses a library here; the first one named may be that")
    assert startup.missing_libraries(broken_plugin, ldd="/nonexistent/ldd") == ["libxcb-keysyms.so.9"]


def test_every_library_of_the_plugin_has_a_debian_package(plugin: Path) -> None:
    if shutil.which("ldd") is None:
        pytest.skip("no ldd on this machine")
    out = subprocess.run(["ldd", str(plugin)], capture_output=True, text=True, check=True).stdout
    qt_dir = str(plugin.parents[2])
    system = {m.group(1) for m in re.finditer(r"^\s*(\S+) => (\S+)", out, re.MULTILINE)
              if not m.group(2).startswith(qt_dir) and "/PySide6/" not in m.group(2)}
    unmapped = system - set(startup.DEBIAN_PACKAGES) - {"libc.so.6", "libm.so.6", "libpthread.so.0",
                                                        "libdl.so.2", "librt.so.1"}
    assert not unmapped, f"add these sonames' Debian packages to startup.DEBIAN_PACKAGES: {sorted(unmapped)}"


def test_ci_and_readme_install_the_same_packages_and_all_xcb_ones() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    ci_packages = set(re.search(r"X11_PACKAGES=\(([^)]*)\)", ci).group(1).split())
    readme = (ROOT / "README.md").read_text()
    apt = re.search(r"sudo apt-get install ([^\n`]+)", readme)
    assert apt, "README has no apt-get line"
    readme_packages = set(apt.group(1).split())
    assert ci_packages == readme_packages | {"xvfb"}
    xcb_packages = {pkg for so, pkg in startup.DEBIAN_PACKAGES.items()
                    if so.startswith(("libxcb", "libxkbcommon", "libX11"))}
    assert xcb_packages <= readme_packages, sorted(xcb_packages - readme_packages)


def test_check_is_cheap() -> None:
    env = {"DISPLAY": ":59"}  # nothing listens there: ldd runs, then the X connection is refused
    best = min(_timed(lambda: startup.check_display(env, LINUX)) for _ in range(3))
    assert best < 0.1, f"start-up check took {best * 1000:.0f} ms"


def _timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def test_refused_x_connection_is_reported(plugin: Path) -> None:
    if startup.missing_libraries(plugin):
        pytest.skip("the xcb plugin misses libraries here, which are reported first")
    message = one_line(startup.check_display({"DISPLAY": ":59"}, LINUX))
    assert "cannot connect to the X server DISPLAY=':59'" in message and "xcb error 1" in message


# ---------------------------------------------------------------------------- as a user runs it


def _gui_command() -> list[str]:
    script = Path(sys.executable).parent / "steerdesk"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "steerdesk"]


def _assert_one_clean_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "qt.qpa" not in result.stderr
    assert "Aborted" not in result.stderr and "could not load" not in result.stderr.lower()
    return one_line(lines[0])


def test_gui_entry_without_any_display_exits_2_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(_gui_command(), check=False, env=clean_env(STEERDESK_DATA_DIR=str(tmp_path)),
                            capture_output=True, text=True, timeout=60)
    line = _assert_one_clean_line(result)
    assert "no display" in line and "QT_QPA_PLATFORM=offscreen" in line and "steerdesk-cli" in line


def test_gui_entry_with_a_missing_library_exits_2_naming_it(broken_plugin: Path, tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from steerdesk import app, startup; "
            "startup.xcb_plugin = lambda: Path(sys.argv[1]); raise SystemExit(app.main([]))")
    result = subprocess.run([sys.executable, "-c", code, str(broken_plugin)], check=False,
                            env=clean_env(DISPLAY=":59", STEERDESK_DATA_DIR=str(tmp_path)),
                            capture_output=True, text=True, timeout=60)
    line = _assert_one_clean_line(result)
    assert "libxcb-keysyms.so.9" in line


def test_help_says_what_no_arguments_and_self_test_do() -> None:
    result = subprocess.run([*_gui_command(), "--help"], check=False, env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    head, _, rest = result.stdout.partition("usage: steerdesk")
    assert rest, "the command line's own usage is still printed"
    assert "open the window" in head and "--self-test" in head and "steerdesk-cli" in head
    sub = subprocess.run([*_gui_command(), "datasets", "--help"], check=False, env=clean_env(),
                         capture_output=True, text=True, timeout=60)
    assert sub.stdout.startswith("usage: steerdesk datasets"), sub.stdout[:200]  # subcommand help unchanged
