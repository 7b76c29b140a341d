"""Draw context text into an image: word-wrapped, shrunk to fit, then downsampled to the
bucket's resolution (older buckets come out smaller and blurrier: optical forgetting)."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from tkllm_ray.data.fonts import FontChain

MARGIN_FRAC = 0.03
LINE_SPACING = 1.25
MIN_FONT_FRAC = 1 / 80  # smallest font: 16 px on a 1280 canvas
MAX_FONT_FRAC = 1 / 18


@dataclass
class Rendered:
    image: Image.Image
    chars_rendered: int  # characters of the input that made it onto the image
    font_px: int


def wrap(chain: FontChain, text: str, size: int, width: float) -> list[tuple[str, int]]:
    """Greedy word wrap. Returns (line, chars of `text` consumed up to the end of this line)."""
    lines: list[tuple[str, int]] = []
    consumed = 0
    space = chain.width(" ", size)
    for para in text.split("\n"):
        line, line_w = "", 0.0
        for word in para.split(" "):
            w = chain.width(word, size)
            if line and line_w + space + w > width:
                lines.append((line, consumed))
                line, line_w = "", 0.0
            while w > width and len(word) > 1:  # a word wider than a line: hard break
                cut = _fit_prefix(chain, word, size, width)
                lines.append((word[:cut], consumed + cut))
                consumed += cut
                word = word[cut:]
                w = chain.width(word, size)
            line, line_w = (f"{line} {word}", line_w + space + w) if line else (word, w)
            consumed += len(word) + 1
        lines.append((line, min(consumed, len(text))))
    return lines


def _fit_prefix(chain: FontChain, word: str, size: int, width: float) -> int:
    lo, hi = 1, len(word)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if chain.width(word[:mid], size) <= width:
            lo = mid
        else:
            hi = mid - 1
    return lo


def render_text(chain: FontChain, text: str, canvas_px: int, side_px: int) -> Rendered:
    margin = int(canvas_px * MARGIN_FRAC)
    inner = canvas_px - 2 * margin
    lo, hi = max(8, int(canvas_px * MIN_FONT_FRAC)), int(canvas_px * MAX_FONT_FRAC)

    def fits(size: int) -> bool:
        return len(wrap(chain, text, size, inner)) * size * LINE_SPACING <= inner

    # Largest font at which everything fits (binary search); if none does, the smallest font
    # and the text is cut where the page ends.
    size = lo
    if fits(lo):
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        size = lo
    lines = wrap(chain, text, size, inner)
    max_lines = max(1, int(inner // (size * LINE_SPACING)))
    shown = lines[:max_lines]
    img = Image.new("RGB", (canvas_px, canvas_px), (255, 255, 255))
    y = margin
    for line, _ in shown:
        chain.draw(img, (margin, y), line, size)
        y += size * LINE_SPACING
    if side_px != canvas_px:
        img = img.resize((side_px, side_px), Image.LANCZOS)
    chars = len(text) if len(shown) == len(lines) else shown[-1][1]
    return Rendered(img, chars, size)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def ink_fraction(img: Image.Image) -> float:
    """Share of pixels that are not (near) white: used to check glyphs are really drawn."""
    gray = img.convert("L")
    hist = gray.histogram()
    return 1 - sum(hist[245:]) / (img.width * img.height)
