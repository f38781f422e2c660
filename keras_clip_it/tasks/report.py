"""A small self-contained HTML report: sections of text, tables and figures, one file to open or share."""

import base64
import html
import io
import os


class Report:
    """Collects sections and writes them as one HTML file with the figures embedded as PNG.

    Example:
    >>> report = Report("ASIF on emoji")
    >>> report.text("Zero-shot", "12 of 16 right")
    >>> report.table("Results", ["label", "score"], [["gatto", 0.41]])
    >>> "<table>" in report.html()
    True
    """

    def __init__(self, title):
        self.title = title
        self._parts = []

    def text(self, heading, body):
        self._parts.append(f"<h2>{html.escape(heading)}</h2><p>{html.escape(body)}</p>")

    def table(self, heading, columns, rows):
        head = "".join(f"<th>{html.escape(str(column))}</th>" for column in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_format(cell))}</td>" for cell in row) + "</tr>" for row in rows
        )
        self._parts.append(f"<h2>{html.escape(heading)}</h2><table><tr>{head}</tr>{body}</table>")

    def figure(self, heading, figure, caption=""):
        """Adds a matplotlib figure (closed afterwards to free its memory)."""
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(figure)
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        self._parts.append(
            f"<h2>{html.escape(heading)}</h2><figure><img src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    def html(self):
        style = (
            "body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
            "img{max-width:100%}figcaption{color:#666;font-size:90%}"
        )
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(self.title)}</h1>{''.join(self._parts)}</body></html>"
        )

    def save(self, path):
        """Writes the report (creating its folder) and returns the path."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.html())
        return path


def _format(cell):
    return f"{cell:.3f}" if isinstance(cell, float) else str(cell)
