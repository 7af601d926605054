"""The member routes of the client endpoint (issue 10).

    GET  /raftcoord/v1/members   ?consistency=serializable
                                 -> {"members": [{"name", "raft", "client", "voter"}], "leader",
                                     "raft_voters", "revision"}
    POST /raftcoord/v1/members   {"action": "add", "name", "raft", "client", "voter"?: true}
                                 {"action": "promote" | "remove", "name"}
                                 -> {"member", "pending"?, "note"?}

Every change runs on the leader (:mod:`raftcoord.membership` says why): a
node that does not lead forwards the request to the one that does, once
(``X-Raftcoord-Forwarded``), and a leader asked to remove itself first
hands leadership over and then forwards the request to its successor.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

import aiohttp
from aiohttp import web

from raftcoord.commands import Member
from raftcoord.errors import (
    CommandError,
    InvalidInputError,
    NotLeaderError,
    RaftcoordError,
    UnavailableError,
    error_from_code,
)

__all__ = ["FORWARDED_HEADER", "add_member_routes"]

log = logging.getLogger(__name__)

#: Set on a request one node forwards to the leader: it is never forwarded again.
FORWARDED_HEADER: Final = "X-Raftcoord-Forwarded"
_ACTIONS: Final = ("add", "promote", "remove")


def add_member_routes(app: web.Application, endpoint: Any) -> None:
    """Add the member routes, served by ``endpoint`` (the app's ``_Endpoint``)."""
    routes = _MemberRoutes(endpoint)
    app.router.add_get("/raftcoord/v1/members", routes.list)
    app.router.add_post("/raftcoord/v1/members", routes.change)


class _MemberRoutes:
    def __init__(self, endpoint: Any) -> None:
        self.ep = endpoint

    @property
    def membership(self) -> Any:
        membership = getattr(self.ep.coord, "membership", None)
        if membership is None:
            raise InvalidInputError("this node has no member registry (an in-memory coordinator)",
                                    field="members")
        return membership

    async def list(self, request: web.Request) -> web.Response:
        """GET /raftcoord/v1/members."""
        consistency = request.query.get("consistency", "linearizable")
        if consistency not in ("linearizable", "serializable"):
            raise InvalidInputError("consistency must be linearizable or serializable", field="consistency")
        membership = self.membership

        def work() -> dict[str, Any]:
            members = membership.members(consistency=consistency)
            leader = membership.leader()
            return {"members": [m.to_map() for m in members],
                    "leader": leader.name if leader is not None else None,
                    # This node's Raft configuration, which takes a change as
                    # it is appended: a voter being added to a one-node
                    # cluster is here before the registry has it.
                    "raft_voters": self.ep.coord.status().get("voters") or [],
                    "revision": self.ep.coord.revision(consistency="serializable")}

        return await self.ep.run_json(work)

    async def change(self, request: web.Request) -> web.Response:
        """POST /raftcoord/v1/members."""
        body = await self.ep.body(request)
        if not isinstance(body, dict):
            raise InvalidInputError("the body must be a JSON object", field="body")
        action = body.get("action")
        if action not in _ACTIONS:
            raise InvalidInputError(f"action must be one of {', '.join(_ACTIONS)}", field="action")
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInputError("name must be a non-empty string", field="name")
        member = None
        if action == "add":
            voter = body.get("voter", True)
            if not isinstance(voter, bool):
                raise InvalidInputError("voter must be true or false", field="voter")
            try:
                member = Member(name=name, raft=body.get("raft"), client=body.get("client"), voter=voter)
            except CommandError as exc:
                raise InvalidInputError(exc.message, field=exc.field) from None
        membership = self.membership
        status = await self.ep.run(self.ep.coord.status)
        forwarded = FORWARDED_HEADER in request.headers
        if status.get("role") != "leader":
            if forwarded:
                raise NotLeaderError("this node does not lead (any more): retry", field="leader")
            return await self._forward(request, body, status.get("leader"))
        if action == "remove":
            target = next((m for m in await self.ep.run(lambda: membership.members(consistency="linearizable"))
                           if m.name == name), None)
            if target is not None and target.voter and target.raft == status.get("self"):
                new_leader = await self.ep.run(membership.hand_over)
                return await self._forward(request, body, new_leader)
        timeout = self.ep.timeout if self.ep.timeout is not None else 30.0
        timeout = max(timeout, 30.0)
        if action == "add":
            result = await self.ep.run(lambda: membership.add(member, timeout=timeout))
        elif action == "promote":
            result = await self.ep.run(lambda: membership.promote(name, timeout=timeout))
        else:
            result = await self.ep.run(lambda: membership.remove(name, timeout=timeout))
        out = {k: v for k, v in result.items() if k in ("member", "pending", "note")}
        return web.json_response(out)

    async def _forward(self, request: web.Request, body: dict[str, Any], leader_raft: str | None) -> web.Response:
        if not leader_raft:
            raise UnavailableError("no leader known to this node: retry", field="leader")
        members = await self.ep.run(lambda: self.membership.members(consistency="serializable"))
        leader = next((m for m in members if m.raft == leader_raft), None)
        if leader is None:
            raise UnavailableError(f"the leader {leader_raft} is not in this node's member registry yet: retry",
                                   field="leader")
        headers = {FORWARDED_HEADER: self.ep.node_name or "1"}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        url = f"http://{leader.client}/raftcoord/v1/members"
        timeout = aiohttp.ClientTimeout(total=120)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, \
                    session.post(url, json=body, headers=headers) as resp:
                answer = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise UnavailableError(f"forwarding to the leader {leader.name} at {leader.client} failed: {exc}",
                                   field="leader") from None
        if status >= 400 and isinstance(answer, dict) and isinstance(answer.get("code"), str):
            raise error_from_code(answer["code"], str(answer.get("message") or answer.get("error")),
                                  answer.get("field"))
        if status >= 400:
            raise RaftcoordError(f"the leader {leader.name} answered {status}")
        return web.json_response(answer, status=status)
