"""How Grafana files the dashboards and alert rules (one folder) and how the dashboards link to each other.

Checked statically on the committed provisioning files and dashboard JSON (no Grafana server here).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import yaml

from grafana import common
from tests.conftest import ROOT

PROVISIONING = ROOT / "grafana" / "provisioning"
DASHBOARD_UIDS = {common.LIVE_UID, common.HISTORY_UID, common.FLOW_UID, common.PIPELINE_UID}


def committed_dashboards() -> dict[str, dict[str, Any]]:
    boards = [json.loads(path.read_text()) for path in (ROOT / "grafana" / "dashboards").glob("*.json")]
    return {board["uid"]: board for board in boards}


def all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in board.get("panels", []):
        found.append(panel)
        found.extend(panel.get("panels", []))  # inside collapsed rows
    return found


def test_alert_rules_and_dashboards_share_one_folder() -> None:
    """Grafana 11.6 files alert rule groups by folder *title* and creates a missing folder with a random uid,
    before dashboards are provisioned; a dashboard provider with a `folderUid` then creates a second folder of
    the same title. Both must find the folder by the same title, and the provider must not ask for a uid."""
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "flowtrack.yaml").read_text())["providers"]
    groups = [group for path in (PROVISIONING / "alerting").glob("*.yaml")
              for group in yaml.safe_load(path.read_text()).get("groups", [])]
    assert providers and groups
    for provider in providers:
        assert "folderUid" not in provider, "a folderUid makes a second folder next to the alert rules' one"
        assert not provider["options"].get("foldersFromFilesStructure")
    titles = {provider["folder"] for provider in providers} | {group["folder"] for group in groups}
    assert titles == {"flowtrack"}


def test_every_dashboard_links_to_every_other_keeping_time_and_variables() -> None:
    boards = committed_dashboards()
    assert set(boards) == DASHBOARD_UIDS
    for uid, board in boards.items():
        targets = {}
        for link in board.get("links", []):
            assert link["type"] == "link" and link["keepTime"] and link["includeVars"], (uid, link)
            targets[urlsplit(link["url"]).path.removeprefix("/d/")] = link["title"]
        assert set(targets) == DASHBOARD_UIDS - {uid}, f"{uid} links to {sorted(targets)}"
        for target, title in targets.items():
            assert title == boards[target]["title"]


def test_node_graphs_outside_the_flow_dashboard_open_it_with_time_and_variables() -> None:
    graphs = [(uid, panel) for uid, board in committed_dashboards().items() if uid != common.FLOW_UID
              for panel in all_panels(board) if panel["type"] == "nodeGraph"]
    assert graphs, "the live dashboard has a node graph"
    for uid, panel in graphs:
        urls = [urlsplit(link["url"]) for link in panel.get("links", [])]
        to_flow = [url for url in urls if url.path == f"/d/{common.FLOW_UID}"]
        assert to_flow, f"node graph {panel['title']!r} of {uid} has no link to the flow dashboard"
        query = dict(parse_qsl(to_flow[0].query, keep_blank_values=True))
        assert {"${__all_variables}", "${__url_time_range}"} <= set(query), to_flow[0].query
