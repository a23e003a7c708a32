"""Colours as models, users and the DSA write them: ``#rgb``, ``#rrggbb``, ``rgb(r,g,b)``, ``rgba(r,g,b,a)`` (the
large_image annotation schema's forms) or QuPath's ``[r, g, b]``; every value 0-255."""

import numbers
import re

from .errors import CellRCNNError

_CSS = re.compile(r'rgba?\(\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*(?:,\s*[\d.]+\s*)?\)')


def parse_rgb(color):
    """``(r, g, b)`` of ``color``, or None when it is none of the forms above."""
    if isinstance(color, str):
        text = color.strip().lower()
        if re.fullmatch(r'#[0-9a-f]{6}', text):
            rgb = tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))
        elif re.fullmatch(r'#[0-9a-f]{3}', text):
            rgb = tuple(17 * int(c, 16) for c in text[1:])
        else:
            match = _CSS.fullmatch(text)
            rgb = tuple(int(v) for v in match.groups()) if match else None
    elif isinstance(color, (list, tuple)) and len(color) == 3 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in color):
        rgb = tuple(int(v) for v in color)
    else:
        rgb = None
    return rgb if rgb is not None and all(0 <= v <= 255 for v in rgb) else None


def rgb_tuple(color, what='a colour'):
    """``(r, g, b)`` of ``color``; a one-line error naming ``what`` when it is not a colour."""
    rgb = parse_rgb(color)
    if rgb is None:
        raise CellRCNNError(f'{what} must be #rrggbb, rgb(r,g,b) or [r, g, b] with values 0-255; got {color!r}')
    return rgb


def hex_color(color):
    """``color`` written ``#rrggbb``; None when it is not a colour."""
    rgb = parse_rgb(color)
    return '#{:02x}{:02x}{:02x}'.format(*rgb) if rgb else None


def rgb_components(color):
    """The 'r,g,b' of a colour, as CSS ``rgba()`` takes it."""
    return ','.join(map(str, rgb_tuple(color)))
