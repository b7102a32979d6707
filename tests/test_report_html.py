"""``drainer.report_html``: the document's structure and escaping (pure), and a real headless
Chromium that parses it, logs no console error and paints the charts' colours."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import zlib
from collections import Counter
from pathlib import Path

import pytest

from drainer.analyze import LoadedSession, analyze
from drainer.models import Attempt
from drainer.report_html import COLOURS, render_html

CHROMIUM = Path("/usr/bin/chromium")
CHART_IDS = ("chart-timeline", "chart-durations", "chart-fingerprints", "chart-yield")
EVIL = "FAILED|rc1|<script>alert('x')</script> & more"
EVIL_RUN = 'run-<img src="http://evil.example/x.png">'


def attempt(
    n: int,
    lane: int,
    start: float | None,
    duration: float,
    *,
    run_id: str = "build-1",
    success: bool = False,
    timed_out: bool = False,
    cancelled: bool = False,
    interrupted: bool = False,
    fingerprint: str | None = None,
    events: int | None = None,
) -> Attempt:
    """Attempt ``n`` on ``lane`` that started ``start`` seconds after 10:00:00 (None: no times)."""

    def stamp(seconds: float) -> str:
        return f"2025-01-01T10:{int(seconds) // 60:02d}:{seconds % 60:06.3f}+00:00"

    return Attempt(
        run_id=run_id,
        phase_id=f"p{n}",
        phase_index=n,
        initial_state="FAILED",
        attempt_id=f"a{n}",
        attempt_number=1,
        lane=lane,
        started_at="" if start is None else stamp(start),
        finished_at=None if start is None else stamp(start + duration),
        success=success,
        error_message=None if success else fingerprint,
        subprocess_duration_seconds=duration,
        failure_fingerprint=None if success else fingerprint,
        telemetry_events_collected=events,
        telemetry_yield_per_minute=None if events is None else 60 * events / duration,
        timed_out=timed_out,
        cancelled=cancelled,
        interrupted=interrupted,
    )


ATTEMPTS = [
    attempt(1, 0, 0, 300, success=True, events=40),
    attempt(2, 1, 5, 120, fingerprint=EVIL, events=0),
    attempt(3, 2, 10, 600, run_id=EVIL_RUN, timed_out=True, fingerprint="FAILED|timeout", events=3),
    attempt(4, 1, 130, 400, success=True, events=None),
    attempt(5, 0, 305, 90, fingerprint=EVIL, events=0),
    attempt(6, 2, 615, 30, cancelled=True, fingerprint="FAILED|rcN|cancelled", events=0),
    attempt(7, 0, 400, 200, interrupted=True, events=1),
    attempt(8, 1, 540, 100, run_id=EVIL_RUN, success=True, events=12),
    attempt(9, 1, None, 50, fingerprint=EVIL),  # no timestamps: not on the timeline
]


def sample_session(results: list[Attempt] | None = None) -> LoadedSession:
    return LoadedSession(
        session_id="batch-drain-<sid>",
        source=Path("sessions/x.json"),
        read=lambda: ATTEMPTS if results is None else results,
        stop_reason="batch_size",
        started_at="2025-01-01T10:00:00.000+00:00",
        completed_at="2025-01-01T10:20:00.000+00:00",
        stopped_runs={EVIL_RUN: "fingerprint_repeats"},
    )


def render(session: LoadedSession) -> str:
    return render_html(session, analyze(session))


def svg_of(doc: str, chart_id: str) -> str:
    match = re.search(rf'<svg id="{chart_id}".*?</svg>', doc, re.S)
    assert match, f"no <svg id={chart_id}>"
    return match.group(0)


# -- pure -------------------------------------------------------------------------------------


def test_document_has_the_four_charts_with_titles() -> None:
    doc = render(sample_session())
    assert doc.startswith("<!DOCTYPE html>")
    for chart_id in CHART_IDS:
        assert "<title>" in svg_of(doc, chart_id)


def test_timeline_draws_one_rect_per_timed_attempt_in_outcome_colours() -> None:
    timeline = svg_of(render(sample_session()), "chart-timeline")
    timed = [a for a in ATTEMPTS if a.started_at and a.finished_at]
    assert timeline.count('class="attempt"') == len(timed) == 8
    for colour in COLOURS.values():
        assert f'fill="{colour}"' in timeline
    lanes = re.findall(r">lane (\d+)<", timeline)
    assert lanes == ["0", "1", "2"]
    assert "seconds since the session start" in timeline


def test_other_charts_show_their_data() -> None:
    doc = render(sample_session())
    bins = svg_of(doc, "chart-durations")
    assert sum(int(n) for n in re.findall(r": (\d+) attempt\(s\)</title>", bins)) == 8  # 7 ran
    fps = svg_of(doc, "chart-fingerprints")
    assert fps.count('class="fp"') == 3
    yields = svg_of(doc, "chart-yield")
    # Events known for 7 attempts: 4 yielded some, 3 none (a mark at zero, not blank space).
    assert yields.count('class="yield"') == 4 and yields.count('class="zero"') == 3
    assert yields.count('class="unknown"') == 2
    assert "unknown telemetry" in doc


def test_every_chart_has_axis_labels_and_a_legend() -> None:
    doc = render(sample_session())
    labels = {"chart-timeline": "seconds since the session start",
              "chart-durations": "subprocess duration (seconds)",
              "chart-fingerprints": "failed attempts",
              "chart-yield": "attempts in start order"}
    for chart_id, label in labels.items():
        svg = svg_of(doc, chart_id)
        assert label in svg and '<g class="legend">' in svg, chart_id


def test_fingerprint_labels_are_cut_with_the_full_text_in_a_tooltip() -> None:
    long_fp = "FAILED|rc1|" + "x" * 120
    doc = render(sample_session([attempt(1, 0, 0, 10, fingerprint=long_fp)]))
    fps = svg_of(doc, "chart-fingerprints")
    assert f"<title>{long_fp}</title>" in fps
    labels = re.findall(r"</title>([^<]*)</text>", fps)
    assert labels and len(labels[0]) == 60 and labels[0].endswith("...")


def test_session_text_is_escaped_and_nothing_external_is_referenced() -> None:
    doc = render(sample_session())
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in doc
    assert "&lt;img src=&quot;http://evil.example/x.png&quot;&gt;" in doc
    assert "&lt;sid&gt;" in doc
    assert "<script" not in doc.lower()
    assert "<img" not in doc.lower()
    # the only http text is the escaped run id; no attribute points anywhere
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", doc, re.I)
    assert re.sub(r"&lt;img src=&quot;http://evil[^&]*&quot;&gt;", "", doc).count("http") == 0
    assert "<link" not in doc and "@import" not in doc and "url(" not in doc


def test_empty_session_renders_with_notes_instead_of_charts() -> None:
    doc = render(LoadedSession(session_id="empty", source=Path("e.json")))
    assert "<svg" not in doc
    assert "No attempts" in doc
    assert "Nothing was drained" in doc  # the recommendation is there


def test_attempts_without_times_only_get_a_note() -> None:
    doc = render(sample_session([attempt(1, 0, None, 10, success=True)]))
    assert 'id="chart-timeline"' not in doc
    assert 'id="chart-durations"' in doc


# -- a real browser ---------------------------------------------------------------------------


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit, non-interlaced RGB/RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up, corner = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line) if bpp == 3 else bytes(b for j, b in enumerate(line) if j % 4 != 3))
        prev = line
    return width, height, rows


def colours(rows: list[bytes]) -> Counter[tuple[int, int, int]]:
    """How many pixels of each colour the image has."""
    data = b"".join(rows)
    return Counter(zip(data[0::3], data[1::3], data[2::3], strict=True))


def count_colour(pixels: Counter[tuple[int, int, int]], hex_colour: str,
                 tolerance: int = 8) -> int:
    want = bytes.fromhex(hex_colour.lstrip("#"))
    return sum(n for pixel, n in pixels.items()
               if all(abs(pixel[c] - want[c]) <= tolerance for c in range(3)))


#: screenshots at half scale: a quarter of the pixels to decode and count
HALF_SCALE = ("--window-size=1280,2400", "--force-device-scale-factor=0.5")


def run_chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run with a fresh profile, no network chatter, logs on stderr."""
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def assert_no_console_errors(result: subprocess.CompletedProcess[str]) -> None:
    bad = [line for line in result.stderr.splitlines()
           if "Uncaught" in line or "ERROR:CONSOLE" in line]
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.timeout(180)  # above the two 60 s Chromium limits, so those report a hang first
@pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("DRAINER_REQUIRE_CHROMIUM"),
    reason=f"{CHROMIUM} is not installed (apt-get install chromium)",
)
def test_chromium_parses_and_paints_the_report(tmp_path: Path) -> None:
    assert CHROMIUM.exists(), "DRAINER_REQUIRE_CHROMIUM is set but Chromium is not installed"
    page = tmp_path / "report.html"
    page.write_text(render(sample_session()), encoding="utf-8")

    dom = run_chromium(tmp_path / "profile-dom", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    for chart_id in CHART_IDS:
        assert f'id="{chart_id}"' in dom.stdout
    assert_no_console_errors(dom)

    png = tmp_path / "report.png"
    shot = run_chromium(tmp_path / "profile-shot", f"--screenshot={png}", *HALF_SCALE,
                        page.as_uri())
    assert png.is_file(), shot.stderr[-2000:]
    assert_no_console_errors(shot)
    width, height, rows = decode_png(png.read_bytes())
    assert (width, height) == (640, 1200)
    pixels = colours(rows)
    # The timeline's green rects are ~295 x 10 px at half scale, the red ones (timeline and
    # fingerprint bars) bigger still: thousands of pixels each, far above anti-aliasing noise
    # (the full-size page's thresholds, over the 4 of half scale; seen: 5369, 5614, 4032).
    assert count_colour(pixels, COLOURS["success"]) > 500
    assert count_colour(pixels, COLOURS["failed"]) > 500
    assert count_colour(pixels, COLOURS["timeout"]) > 125


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("DRAINER_REQUIRE_CHROMIUM"),
    reason=f"{CHROMIUM} is not installed (apt-get install chromium)",
)
def test_the_demo_sessions_report_opens_in_chromium_with_its_charts(tmp_path: Path) -> None:
    assert CHROMIUM.exists(), "DRAINER_REQUIRE_CHROMIUM is set but Chromium is not installed"
    import sys

    demo = subprocess.run([sys.executable, "-m", "drainer", "demo", "--dir", "d"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0, demo.stderr
    page = tmp_path / "demo-report.html"
    analyze = subprocess.run(
        [sys.executable, "-m", "drainer", "analyze", "--session-dir", "d/sessions",
         "--html", str(page)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert analyze.returncode == 0, analyze.stderr
    dom = run_chromium(tmp_path / "profile-dom", "--dump-dom", page.as_uri())
    for chart_id in CHART_IDS:
        assert f'id="{chart_id}"' in dom.stdout
    assert_no_console_errors(dom)
    png = tmp_path / "demo-report.png"
    shot = run_chromium(tmp_path / "profile-shot", f"--screenshot={png}", *HALF_SCALE,
                        page.as_uri())
    assert png.is_file(), shot.stderr[-2000:]
    assert_no_console_errors(shot)
    pixels = colours(decode_png(png.read_bytes())[2])
    # The demo has successes, failures and two timeouts: all three colours are painted.
    assert count_colour(pixels, COLOURS["success"]) > 125
    assert count_colour(pixels, COLOURS["failed"]) > 125
    assert count_colour(pixels, COLOURS["timeout"]) > 25
