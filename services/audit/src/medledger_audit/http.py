"""The log over HTTP in the C2SP `tlog-tiles` layout, for verifiers, witnesses and monitors.

- `GET /checkpoint`: the latest signed checkpoint note (public);
- `GET /tile/<L>/<N>[.p/<W>]`: a hash tile (public: hashes reveal nothing);
- `GET /tile/entries/<N>[.p/<W>]`: an entry bundle, for auditors only (`Authorization: Bearer`
  with the `auditor` role). A bundle holds 256 entries about many patients, so no patient's own
  token can open one; patients read the entries about themselves through `ListEntries`.

Full tiles never change and are served as immutable; partial tiles and the checkpoint change as
the log grows. A tile the tree has not reached yet is 404.
"""

from __future__ import annotations

from aiohttp import web

from medledger_audit import storage, tile_store
from medledger_audit.checkpoints import Checkpointer
from medledger_runtime.errors import DataLoss, InvalidArgument
from medledger_runtime.http_server import HttpRoute, authenticate
from medledger_runtime.service import ServiceRuntime
from medledger_verifier import tlog

_IMMUTABLE = "public, max-age=31536000, immutable"
_FRESH = "no-cache"


class TilesHttp:
    """The handlers of the log's HTTP routes; the runtime serves them (see `routes`)."""

    def __init__(self, runtime: ServiceRuntime, checkpointer: Checkpointer) -> None:
        self.rt = runtime
        self.checkpointer = checkpointer
        self.tiles = tile_store.DatabaseTiles(runtime.db)

    def routes(self) -> list[HttpRoute]:
        # Public: entry bundles ask for an auditor's token themselves, once the tile exists.
        return [
            HttpRoute.get("/checkpoint", self._checkpoint, public=True),
            HttpRoute.get("/tile/{path:.+}", self._tile, public=True),
        ]

    async def _checkpoint(self, request: web.Request) -> web.Response:
        latest = await self.checkpointer.latest()
        if latest is None:
            return web.Response(status=404, text="no checkpoint has been signed yet\n")
        note, _ = latest
        return web.Response(text=note, content_type="text/plain", charset="utf-8", headers={"Cache-Control": _FRESH})

    async def _tile(self, request: web.Request) -> web.Response:
        try:
            tile = tlog.parse_tile_path("tile/" + request.match_info["path"])
        except InvalidArgument:
            return web.Response(status=404, text="not a tile path\n")
        async with self.rt.db.read() as conn:
            tree_size, _ = await storage.read_state(conn)
        if tlog.tile_width_at(tile.level, tile.index, tree_size) < tile.width:
            return web.Response(status=404, text="the log has not reached this tile\n")
        if tile.level == tlog.ENTRIES_LEVEL:
            refused = await self._auditor_only(request)
            if refused is not None:
                return refused
            try:
                async with self.rt.db.read() as conn:
                    body = await storage.entry_bundle(conn, tile)
            except DataLoss:
                return web.Response(status=404, text="an entry of this bundle was redacted\n")
        else:
            body = (await self.tiles.read_tiles([tile]))[0]
        cache = _IMMUTABLE if tile.is_full else _FRESH
        return web.Response(body=body, content_type="application/octet-stream", headers={"Cache-Control": cache})

    async def _auditor_only(self, request: web.Request) -> web.Response | None:
        # Without a valid token: Unauthenticated, which the runtime answers 401.
        caller = await authenticate(request)
        if not caller.has_role("auditor"):
            return web.Response(status=403, text="entry bundles are for auditors\n")
        if caller.scopes is not None:
            # A SMART-scoped token reaches FHIR resources only, and raw log entries are none.
            return web.Response(status=403, text="this token's scopes do not allow entry bundles\n")
        return None
