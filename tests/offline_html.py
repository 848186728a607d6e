"""The strict offline check of a report: nothing in it may load from a network."""
import html.parser


class _Links(html.parser.HTMLParser):
    """Every attribute value of every tag, and the text of <style> elements."""

    def __init__(self):
        super().__init__()
        self.values, self.styles, self._in_style = [], [], False

    def handle_starttag(self, tag, attrs):
        self.values += [v for k, v in attrs if v is not None and k != "xmlns"]
        self._in_style = tag == "style"

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def assert_offline(page: str):
    """No attribute loads anything from a network (http:, https: or protocol-relative //), no CSS url()."""
    links = _Links()
    links.feed(page)
    assert links.values, "no attribute parsed"
    remote = [v for v in links.values if v.strip().lower().startswith(("http:", "https:", "//"))]
    assert not remote, remote[:3]
    assert not any("url(" in style and "url(data:" not in style for style in links.styles)
