"""Small PNG charts drawn with Pillow (no plotting library is a dependency).

`scatter_png` draws points (optionally a step line through them) on linear or log axes
with labelled ticks; `curves_png` draws per-epoch curves in stacked panels; `tile_png`
lays existing images out as one contact sheet.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 640, 420
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 36, 56
POINT, LINE, AXIS, GRID = (31, 119, 180), (214, 39, 40), (40, 40, 40), (225, 225, 225)
SERIES = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127)]
PANEL_HEIGHT = 260


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _ticks(low: float, high: float, log: bool, count: int = 5) -> list[float]:
    if log:
        first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
        return [10.0 ** e for e in range(first, last + 1) if low <= 10.0 ** e <= high] or [low, high]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def integer_ticks(low: float, high: float, most: int = 8) -> list[int]:
    """Whole numbers in [low, high], evenly stepped, at most `most`: trials and integer
    parameters have no ticks between them."""
    first, last = math.ceil(low), math.floor(high)
    step = max(1, math.ceil((last - first + 1) / most))
    return list(range(first, last + 1, step))


def _label(value: float) -> str:
    return f"{value:.3g}"


def scatter_png(path: str | Path, xs: list, ys: list[float], *, title: str, xlabel: str, ylabel: str,
                log_x: bool = False, step_line: list[float] | None = None) -> Path:
    """Points (xs numeric, or strings drawn as evenly spaced categories) against ys."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(11)
    categories = sorted({str(x) for x in xs}) if any(isinstance(x, str) for x in xs) else None
    if categories:
        positions = [categories.index(str(x)) for x in xs]
        x_low, x_high, log_x = -0.5, len(categories) - 0.5, False
    else:
        positions = [float(x) for x in xs]
        x_low, x_high = min(positions), max(positions)
    values = ys + (step_line or [])
    y_low, y_high = min(values), max(values)
    if y_high - y_low < 1e-9:
        y_low, y_high = y_low - 0.01, y_high + 0.01
    pad = 0.05 * (y_high - y_low)  # keep edge points inside the frame
    y_low, y_high = y_low - pad, y_high + pad
    log_x = log_x and x_low > 0
    if x_high - x_low < 1e-12:
        x_low, x_high = (x_low / 2, x_high * 2) if log_x else (x_low - 1, x_high + 1)
    elif log_x:
        x_low, x_high = x_low / 1.15, x_high * 1.15
    elif not categories:
        pad = 0.04 * (x_high - x_low)
        x_low, x_high = x_low - pad, x_high + pad

    def to_x(value: float) -> float:
        low, high, v = (math.log10(x_low), math.log10(x_high), math.log10(value)) if log_x \
            else (x_low, x_high, value)
        return MARGIN_LEFT + (v - low) / (high - low) * (WIDTH - MARGIN_LEFT - MARGIN_RIGHT)

    def to_y(value: float) -> float:
        span = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
        return HEIGHT - MARGIN_BOTTOM - (value - y_low) / (y_high - y_low) * span

    for tick in _ticks(y_low, y_high, log=False):
        draw.line([(MARGIN_LEFT, to_y(tick)), (WIDTH - MARGIN_RIGHT, to_y(tick))], fill=GRID)
        draw.text((MARGIN_LEFT - 6, to_y(tick)), _label(tick), fill=AXIS, font=small, anchor="rm")
    if categories:
        x_ticks = list(enumerate(categories))
    elif not log_x and all(isinstance(x, int) and not isinstance(x, bool) for x in xs):
        x_ticks = [(t, str(t)) for t in integer_ticks(x_low, x_high)]
    else:
        x_ticks = [(t, _label(t)) for t in _ticks(x_low, x_high, log=log_x)]
    for tick, text in x_ticks:
        draw.line([(to_x(tick), HEIGHT - MARGIN_BOTTOM), (to_x(tick), HEIGHT - MARGIN_BOTTOM + 4)], fill=AXIS)
        draw.text((to_x(tick), HEIGHT - MARGIN_BOTTOM + 6), text, fill=AXIS, font=small, anchor="mt")
    draw.line([(MARGIN_LEFT, MARGIN_TOP), (MARGIN_LEFT, HEIGHT - MARGIN_BOTTOM),
               (WIDTH - MARGIN_RIGHT, HEIGHT - MARGIN_BOTTOM)], fill=AXIS, width=1)
    if step_line:
        points = []
        for x, y in zip(positions, step_line, strict=True):
            if points:
                points.append((to_x(x), points[-1][1]))
            points.append((to_x(x), to_y(y)))
        draw.line(points, fill=LINE, width=2)
    for x, y in zip(positions, ys, strict=True):
        cx, cy = to_x(x), to_y(y)
        draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=POINT)
    draw.text((WIDTH / 2, 10), title, fill=AXIS, font=font, anchor="mt")
    draw.text((WIDTH / 2, HEIGHT - 18), xlabel + (" (log)" if log_x else ""), fill=AXIS, font=font, anchor="mt")
    draw.text((8, MARGIN_TOP - 22), ylabel, fill=AXIS, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def curves_png(path: str | Path, panels: list[tuple[str, dict[str, tuple[list, list[float]]]]], *,
               title: str, xlabel: str = "epoch") -> Path:
    """One panel per (name, {series label: (xs, ys)}), stacked under a title, each with its
    own y axis and a legend; panels without points are left out."""
    panels = [(name, {k: v for k, v in series.items() if v[0]}) for name, series in panels]
    panels = [(name, series) for name, series in panels if series]
    image = Image.new("RGB", (WIDTH, 30 + PANEL_HEIGHT * max(1, len(panels))), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(11)
    draw.text((WIDTH / 2, 8), title, fill=AXIS, font=font, anchor="mt")
    for index, (name, series) in enumerate(panels):
        top = 30 + index * PANEL_HEIGHT
        _line_panel(draw, (MARGIN_LEFT, top + 24, WIDTH - MARGIN_RIGHT, top + PANEL_HEIGHT - 40), series,
                    small)
        draw.text((8, top + 4), name, fill=AXIS, font=font)
        draw.text((WIDTH / 2, top + PANEL_HEIGHT - 22), xlabel, fill=AXIS, font=small, anchor="mt")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _line_panel(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float],
                series: dict[str, tuple[list, list[float]]], font) -> None:
    left, top, right, bottom = box
    xs = [float(x) for points, _ in series.values() for x in points]
    ys = [float(y) for _, values in series.values() for y in values]
    x_low, x_high = min(xs), max(xs)
    if x_high - x_low < 1e-12:
        x_low, x_high = x_low - 1, x_high + 1
    y_low, y_high = min(ys), max(ys)
    if y_high - y_low < 1e-9:
        y_low, y_high = y_low - 0.01, y_high + 0.01
    pad = 0.05 * (y_high - y_low)
    y_low, y_high = y_low - pad, y_high + pad

    def point(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * (right - left),
                bottom - (y - y_low) / (y_high - y_low) * (bottom - top))

    ticks = _ticks(y_low, y_high, log=False)
    digits = max(0, 1 - math.floor(math.log10(ticks[1] - ticks[0])))  # enough to tell neighbours apart
    for tick in ticks:
        draw.line([point(x_low, tick), point(x_high, tick)], fill=GRID)
        draw.text((left - 6, point(x_low, tick)[1]), f"{tick:.{digits}f}", fill=AXIS, font=font, anchor="rm")
    whole = [x for x in range(math.ceil(x_low), math.floor(x_high) + 1)]
    step = max(1, math.ceil(len(whole) / 10))  # at most ~10 epoch labels
    for tick in whole[::step]:
        x, _ = point(tick, y_low)
        draw.line([(x, bottom), (x, bottom + 4)], fill=AXIS)
        draw.text((x, bottom + 6), str(tick), fill=AXIS, font=font, anchor="mt")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS)
    legend_x = left + 8
    for index, (label, (points, values)) in enumerate(series.items()):
        colour = SERIES[index % len(SERIES)]
        line = [point(float(x), float(y)) for x, y in zip(points, values, strict=True)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for cx, cy in line:
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
        draw.line([(legend_x, top + 6), (legend_x + 14, top + 6)], fill=colour, width=3)
        draw.text((legend_x + 18, top + 6), label, fill=AXIS, font=font, anchor="lm")
        legend_x += 30 + draw.textlength(label, font=font)


def tile_png(path: str | Path, images: list[str | Path], *, title: str, width: int = 256,
             columns: int = 4) -> Path:
    """Existing images scaled to `width` and laid out `columns` to a row under a title."""
    loaded = [Image.open(p).convert("RGB") for p in images]
    scaled = [im.resize((width, max(1, round(im.height * width / im.width)))) for im in loaded]
    columns = min(columns, len(scaled))
    rows = [scaled[i:i + columns] for i in range(0, len(scaled), columns)]
    heights = [max(im.height for im in row) for row in rows]
    sheet = Image.new("RGB", (columns * width, 30 + sum(heights)), "white")
    ImageDraw.Draw(sheet).text((8, 8), title, fill=AXIS, font=_font(14))
    top = 30
    for row, height in zip(rows, heights, strict=True):
        for column, im in enumerate(row):
            sheet.paste(im, (column * width, top))
        top += height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
