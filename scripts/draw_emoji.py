"""Draw the embedded emoji (image, caption) pairs from the Noto Color Emoji font.

`kci.datasets.emoji_pairs` ships its images inside the package so no system font is needed at run time;
this script is how those files were made, and rerunning it reproduces them. Every fully qualified emoji of
PyPI `emoji` that has an Italian name is drawn with the font of Debian `fonts-noto-color-emoji`, except
skin-tone and hair-style variants (near-copies of their base emoji that would crowd retrieval results)
and emoji the font cannot draw as a single glyph (newer than the font, or unsupported sequences). Exact
duplicate drawings (e.g. the flags of Norway, Svalbard and Bouvet Island) keep only the entry with the
shortest English name, so each image has one correct caption.

The images are 128x128 RGB tiles on white, packed row-major into one AVIF sprite sheet with 4:4:4
chroma: measured on this set, AVIF at quality 85 is 4.0 MB with a per-tile PSNR >= 35 dB, where lossless
WebP needs 12.7 MB and PNG 16.8 MB at the same size, and WebP's 4:2:0 chroma blurs the flat colours to
~33 dB. A JSON manifest lists ids, captions, splits and the sheet's SHA-256.

Ids are the code points of the fully qualified sequence (e.g. "1f600", "1f468-200d-1f373"), and the
train/test split is a seeded hash of the id alone, so adding or removing emoji never moves the others.

Usage:
    python scripts/draw_emoji.py [--font PATH] [--out DIR]

Example:
    python scripts/draw_emoji.py --out /tmp/emoji-check
"""

import argparse
import hashlib
import json
import math
import os
import sys

import numpy as np

DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "keras_clip_it", "data", "embedded")
# CBDT colour fonts hold fixed-size bitmaps; 109 px selects Noto's native 136x128 strikes unscaled.
FONT_SIZE = 109
TILE = 128
COLUMNS = 32
AVIF_QUALITY = 85
SHEET_NAME = "emoji_128.avif"
MANIFEST_NAME = "emoji.json"
SPLIT_SEED = "keras-clip-it/emoji-pairs/v1"
TEST_FRACTION = 0.22
# A drawn glyph covers thousands of pixels; fewer means the font drew nothing (a missing glyph).
MIN_INK_PIXELS = 500
SKIN_TONES = {chr(code) for code in range(0x1F3FB, 0x1F400)}
HAIR_STYLES = {chr(code) for code in range(0x1F9B0, 0x1F9B4)}
REGIONAL_INDICATORS = {chr(code) for code in range(0x1F1E6, 0x1F200)}
SUBDIVISION_TAGS = {chr(code) for code in range(0xE0020, 0xE0080)}


def emoji_id(chars):
    """The stable id of an emoji: its code points in lowercase hex joined by "-"."""
    return "-".join(f"{ord(char):x}" for char in chars)


def split_of(item_id):
    """The split of an id, "train" or "test": a seeded hash of the id, so it never changes."""
    digest = hashlib.sha256(f"{SPLIT_SEED}:{item_id}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < TEST_FRACTION else "train"


def clean_name(name):
    """A caption from an `emoji` package name: ":medaglia_d’oro:" -> "medaglia d'oro"."""
    text = name.strip(":").replace("_", " ")
    return text.replace("\u2019", "'").replace("\u201c", '"').replace("\u201d", '"')


def english_caption(chars, name):
    """The English caption: the cleaned name, with "flag" added to country and region flags.

    The `emoji` package names the flag of Italy just "Italy" in English but "bandiera italia" in
    Italian; the caption should say what the image shows, in both languages.
    """
    caption = clean_name(name)
    if set(chars) <= REGIONAL_INDICATORS or set(chars) & SUBDIVISION_TAGS:
        caption += " flag"
    return caption


def candidates():
    """Fully qualified emoji with an Italian name, without skin-tone and hair-style variants."""
    import emoji

    emoji.config.load_language("it")
    fully_qualified = emoji.STATUS["fully_qualified"]
    for chars, data in emoji.EMOJI_DATA.items():
        if data["status"] != fully_qualified or "it" not in data:
            continue
        if set(chars) & (SKIN_TONES | HAIR_STYLES):
            continue
        yield chars, data


def draw(font, chars):
    """Draw one emoji as a (TILE, TILE, 3) uint8 tile on white, or None if the font cannot draw it."""
    from PIL import Image
    from PIL import ImageDraw

    single_advance = font.getlength("\U0001F600")
    # An unsupported ZWJ or flag sequence falls apart into several glyphs side by side.
    if font.getlength(chars) > 1.05 * single_advance:
        return None
    width = math.ceil(single_advance)
    canvas = Image.new("RGBA", (width, width), (255, 255, 255, 0))
    _, top, _, bottom = font.getbbox(chars)
    ImageDraw.Draw(canvas).text((0, (width - (bottom - top)) // 2 - top), chars, font=font, embedded_color=True)
    if int((np.asarray(canvas)[..., 3] > 0).sum()) < MIN_INK_PIXELS:
        return None
    white = Image.new("RGBA", canvas.size, (255, 255, 255, 255))
    white.alpha_composite(canvas)
    return np.asarray(white.convert("RGB").resize((TILE, TILE), Image.Resampling.LANCZOS))


def draw_all(font_path):
    """Draw every candidate; returns (items, tiles, skipped) with items sorted by id."""
    from PIL import ImageFont

    font = ImageFont.truetype(font_path, FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)
    drawn, skipped = {}, []
    for chars, data in candidates():
        tile = draw(font, chars)
        if tile is None:
            skipped.append((emoji_id(chars), clean_name(data["en"]), "not drawn by the font"))
            continue
        item = {
            "id": emoji_id(chars),
            "emoji": chars,
            "en": english_caption(chars, data["en"]),
            "it": clean_name(data["it"]),
            "unicode_version": data["E"],
        }
        item["split"] = split_of(item["id"])
        drawn[item["id"]] = (item, tile)

    by_pixels = {}
    for item, tile in drawn.values():
        by_pixels.setdefault(hashlib.sha256(tile.tobytes()).digest(), []).append(item)
    for group in by_pixels.values():
        group.sort(key=lambda item: (len(item["en"]), item["id"]))
        for duplicate in group[1:]:
            skipped.append((duplicate["id"], duplicate["en"], f"same drawing as {group[0]['en']!r}"))
            del drawn[duplicate["id"]]

    ids = sorted(drawn)
    return [drawn[i][0] for i in ids], np.stack([drawn[i][1] for i in ids]), skipped


def sprite_sheet(tiles):
    """Pack tiles row-major into one white (rows * TILE, COLUMNS * TILE, 3) image."""
    rows = math.ceil(len(tiles) / COLUMNS)
    sheet = np.full((rows * TILE, COLUMNS * TILE, 3), 255, np.uint8)
    for index, tile in enumerate(tiles):
        row, column = divmod(index, COLUMNS)
        sheet[row * TILE : (row + 1) * TILE, column * TILE : (column + 1) * TILE] = tile
    return sheet


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--font", default=DEFAULT_FONT, help="NotoColorEmoji.ttf (Debian fonts-noto-color-emoji)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    if not os.path.exists(args.font):
        sys.exit(f"font {args.font!r} not found: install Debian fonts-noto-color-emoji or pass --font")

    import emoji
    from PIL import Image
    from PIL import features

    if not features.check("avif"):
        sys.exit("this Pillow cannot write AVIF: install Pillow >= 11.3")
    items, tiles, skipped = draw_all(args.font)
    for item_id, name, reason in skipped:
        print(f"skipped {item_id} ({name}): {reason}")

    os.makedirs(args.out, exist_ok=True)
    sheet = sprite_sheet(tiles)
    sheet_path = os.path.join(args.out, SHEET_NAME)
    Image.fromarray(sheet).save(sheet_path, format="AVIF", quality=AVIF_QUALITY, subsampling="4:4:4")
    with open(sheet_path, "rb") as file:
        sheet_bytes = file.read()
    error = (np.asarray(Image.open(sheet_path).convert("RGB")).astype(np.float64) - sheet) ** 2
    psnr = 10 * math.log10(255**2 / error.mean())

    header = {
        "format": 1,
        "description": "Noto Color Emoji drawings with English and Italian CLDR names; see NOTICE",
        "sheet": SHEET_NAME,
        "sheet_sha256": hashlib.sha256(sheet_bytes).hexdigest(),
        "tile_size": TILE,
        "columns": COLUMNS,
        "count": len(items),
        "font": os.path.basename(args.font),
        "emoji_package": emoji.__version__,
        "split_seed": SPLIT_SEED,
    }
    # One item per line keeps the manifest small and its diffs readable when the set changes.
    lines = [json.dumps(item, ensure_ascii=False) for item in items]
    text = json.dumps(header, ensure_ascii=False, indent=1)[:-2] + ',\n "items": [\n' + ",\n".join(lines) + "\n ]\n}\n"
    with open(os.path.join(args.out, MANIFEST_NAME), "w", encoding="utf-8") as file:
        file.write(text)

    test = sum(item["split"] == "test" for item in items)
    print(
        f"{len(items)} pairs ({len(items) - test} train, {test} test), {len(skipped)} skipped; "
        f"{SHEET_NAME}: {len(sheet_bytes) / 1e6:.2f} MB, PSNR {psnr:.1f} dB"
    )


if __name__ == "__main__":
    main()
