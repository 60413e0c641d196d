"""``bus-guard console``: the operator's local web console (README, "The operator console").

A page on loopback, behind a random access token, that shows live what the gateways
decide: decision rates by effect and reason, the feed of denials and holds, the open holds
with Approve and Reject (signed in this process with ``--approver-key``, as ``bus-guard
approve`` signs), each gateway's identity and health from ``$SRV`` stats, and a decision's
lineage. Needs the ``console`` extra (aiohttp).

:class:`Console` (``_server``) runs it; ``_bus`` reads the bus, ``_web`` serves the page
and guards it, ``_model`` turns what the bus says into what the page shows.
"""

from bus_guard.cli.console._bus import ConsoleSettings
from bus_guard.cli.console._server import Console
from bus_guard.cli.console._web import Listen, parse_listen

__all__ = ("Console", "ConsoleSettings", "Listen", "parse_listen")
