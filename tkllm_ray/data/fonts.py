"""A font fallback chain for rendering captions: a text font, a CJK font, a colour emoji font.

Pillow draws with one font at a time, so text is cut into runs, each drawn with the first font
whose character map covers it. Colour emoji fonts (CBDT) only exist at one bitmap size, so
emoji are drawn at that size and scaled to the line height.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from fontTools.ttLib import TTCollection, TTFont
from PIL import Image, ImageDraw, ImageFont

from tkllm_ray.errors import TkllmError

DEFAULT_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
)
BITMAP_EMOJI_SIZE = 109  # the only size Noto Color Emoji's CBDT strike renders at


@dataclass(frozen=True)
class FontFace:
    path: str
    cmap: frozenset[int]
    is_bitmap: bool


def font_paths(configured: list[str] | None = None) -> list[str]:
    """Configured fonts, else TKLLM_FONTS (colon-separated), else the defaults set-up installs."""
    env = os.environ.get("TKLLM_FONTS")
    paths = list(configured or (env.split(":") if env else DEFAULT_FONTS))
    present = [p for p in paths if os.path.isfile(p)]
    if not present:
        raise TkllmError(
            f"no font found among {paths}: run scripts/setup.sh (installs DejaVu, WenQuanYi, Noto Color Emoji) "
            "or set TKLLM_FONTS"
        )
    return present


@lru_cache(maxsize=16)
def load_face(path: str) -> FontFace:
    font = TTCollection(path).fonts[0] if path.lower().endswith(".ttc") else TTFont(path, lazy=True)
    cmap = frozenset(font.getBestCmap() or {})
    is_bitmap = "CBDT" in font or "sbix" in font
    return FontFace(path, cmap, is_bitmap)


@lru_cache(maxsize=256)
def pil_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, BITMAP_EMOJI_SIZE if load_face(path).is_bitmap else size)


# Characters that ride along with the previous glyph instead of choosing a font themselves.
_JOINERS = {0x200D, 0xFE0F, 0xFE0E, *range(0x1F3FB, 0x1F400)}


class FontChain:
    def __init__(self, paths: list[str] | None = None):
        self.faces = [load_face(p) for p in font_paths(paths)]

    def face_for(self, ch: str) -> FontFace | None:
        cp = ord(ch)
        # Pictographs go to the colour emoji font first, even where the text font has a
        # monochrome glyph: emoji colour is part of a creator's style.
        faces = sorted(self.faces, key=lambda f: not f.is_bitmap) if 0x1F000 <= cp <= 0x1FAFF else self.faces
        for face in faces:
            if cp in face.cmap:
                return face
        return None

    def runs(self, text: str) -> list[tuple[str, FontFace | None]]:
        """Split `text` into maximal runs drawable with one face (None: no face has it)."""
        out: list[tuple[str, FontFace | None]] = []
        for ch in text:
            face = self.face_for(ch)
            if out and (face is out[-1][1] or ord(ch) in _JOINERS):
                out[-1] = (out[-1][0] + ch, out[-1][1])
            else:
                out.append((ch, face))
        return out

    def width(self, text: str, size: int) -> float:
        total = 0.0
        for run, face in self.runs(text):
            total += _run_width(run, face or self.faces[0], size)
        return total

    def draw(self, img: Image.Image, xy: tuple[float, float], text: str, size: int, fill=(20, 20, 20)) -> float:
        """Draw `text` at `xy` (top-left); return the advance width."""
        draw = ImageDraw.Draw(img)
        x, y = xy
        for run, face in self.runs(text):
            face = face or self.faces[0]  # no cover anywhere: the text font's missing-glyph box
            if face.is_bitmap:
                x += _paste_bitmap_run(img, (x, y), run, face, size)
            else:
                draw.text((x, y), run, font=pil_font(face.path, size), fill=fill)
                x += pil_font(face.path, size).getlength(run)
        return x - xy[0]


def _run_width(run: str, face: FontFace, size: int) -> float:
    length = pil_font(face.path, size).getlength(run)
    return length * size / BITMAP_EMOJI_SIZE if face.is_bitmap else length


@lru_cache(maxsize=2048)
def _bitmap_run(path: str, run: str, size: int) -> Image.Image:
    font = pil_font(path, size)
    w = max(1, int(font.getlength(run)))
    tile = Image.new("RGBA", (w, int(BITMAP_EMOJI_SIZE * 1.2)), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text((0, 0), run, font=font, embedded_color=True)
    scale = size / BITMAP_EMOJI_SIZE
    return tile.resize((max(1, round(w * scale)), max(1, round(tile.height * scale))), Image.LANCZOS)


def _paste_bitmap_run(img: Image.Image, xy, run: str, face: FontFace, size: int) -> float:
    tile = _bitmap_run(face.path, run, size)
    img.paste(tile, (round(xy[0]), round(xy[1])), tile)
    return tile.width
