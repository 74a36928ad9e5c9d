"""Header policy: add, remove and rename headers on the request and the response."""

from __future__ import annotations

from meshgate.config.model import HeaderPolicySettings, HeaderRules
from meshgate.gateway.contract import FilterExchange, Verdict

__all__ = ["HeaderFilter", "apply_rules"]


class _Compiled:
    __slots__ = ("add", "drop", "rename")

    def __init__(self, rules: HeaderRules) -> None:
        # Adding replaces: a header that is added is first removed.
        self.drop = frozenset(n.lower().encode() for n in (*rules.remove, *rules.add))
        self.rename = {k.lower().encode(): v.encode() for k, v in rules.rename.items()}
        self.add = b"".join(f"{k}: {v}\r\n".encode() for k, v in rules.add.items())

    @property
    def empty(self) -> bool:
        return not (self.drop or self.rename or self.add)


def apply_rules(lines: bytes, rules: _Compiled) -> bytes:
    """``lines`` (header lines, each ending in CRLF) with ``rules`` applied."""
    if rules.drop or rules.rename:
        out = []
        for line in lines.split(b"\r\n"):
            if not line:
                continue
            name, sep, value = line.partition(b":")
            low = name.lower()
            if low in rules.drop:
                continue
            renamed = rules.rename.get(low)
            out.append(renamed + sep + value if renamed is not None else line)
        lines = b"\r\n".join(out) + b"\r\n" if out else b""
    return lines + rules.add


class HeaderFilter:
    """Applies a route's header policy to its requests and responses."""

    name = "headers"

    def __init__(self, settings: HeaderPolicySettings) -> None:
        self._request = _Compiled(settings.request)
        self._response = _Compiled(settings.response)

    def request(self, exchange: FilterExchange) -> Verdict:
        rules = self._request
        if not rules.empty:
            exchange.rewrite_request_headers(lambda lines: apply_rules(lines, rules))
        return None

    def response(self, exchange: FilterExchange, headers: bytes) -> bytes:
        rules = self._response
        return headers if rules.empty else apply_rules(headers, rules)
