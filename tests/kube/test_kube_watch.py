"""The watch loop against the fake API server with the real kubernetes client."""

from __future__ import annotations

import time

import pytest
from kubernetes import client as k8s

from kubetest import wait_for
from mailgw.kube.client import KubeApi
from mailgw.kube.watch import Watcher


def cr(name, ns="apps"):
    return {"metadata": {"name": name}, "spec": {"destinationRef": {"name": "d"}}}


class Recorder:
    def __init__(self):
        self.lists = []
        self.events = []

    def on_list(self, items):
        self.lists.append(sorted(i["metadata"]["name"] for i in items))

    def on_event(self, kind, obj):
        self.events.append((kind, obj["metadata"]["name"], obj["metadata"]["resourceVersion"]))


@pytest.fixture
def start_watcher(fake, reactor, in_reactor):
    watchers = []

    def start(kind="Destination", timeout_seconds=30, **kw):
        api = KubeApi(k8s.ApiClient(fake.configuration()), timeout=5)
        rec = Recorder()
        w = Watcher(
            kind, lambda: api.list(kind),
            lambda: api.watch_source(kind), rec.on_list, rec.on_event, reactor,
            timeout_seconds=timeout_seconds, min_backoff=0.05, max_backoff=0.2, **kw,
        )
        in_reactor(w.start)
        watchers.append(w)
        wait_for(lambda: fake.open_watches >= 1 and rec.lists, what="the watch to open")
        return w, rec

    yield start
    for w in watchers:
        in_reactor(w.stop)


def test_list_then_events_from_the_list_version(fake, start_watcher):
    fake.create("destinations", "apps", cr("a"))
    w, rec = start_watcher()
    assert rec.lists == [["a"]]
    assert fake.count("GET", r"watch=true.*resourceVersion=101|resourceVersion=101.*watch=true") == 1
    fake.create("destinations", "apps", cr("b"))
    fake.update("destinations", "apps", "a", {"spec": {"service": {"port": 2465}}})
    fake.delete("destinations", "apps", "b")
    wait_for(lambda: len(rec.events) == 3, what="three events")
    assert [(k, n) for k, n, _ in rec.events] == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
    assert w.resource_version == str(fake.rv)
    assert "allowWatchBookmarks=true" in next(p for m, p in fake.requests if "watch=true" in p)


def test_bookmark_moves_the_version(fake, start_watcher):
    w, rec = start_watcher()
    fake.create("services", "other", {"metadata": {"name": "unrelated"}})  # not a Destination
    fake.bookmark()
    wait_for(lambda: w.bookmarks == 1, what="the bookmark")
    assert w.resource_version == str(fake.rv)
    assert rec.events == []


def test_stream_end_resumes_from_last_version_without_relisting(fake, start_watcher):
    w, rec = start_watcher()
    fake.create("destinations", "apps", cr("a"))
    wait_for(lambda: rec.events, what="first event")
    fake.close_watches()
    wait_for(lambda: w.watches == 2 and fake.open_watches == 1, what="the second watch")
    fake.create("destinations", "apps", cr("b"))
    wait_for(lambda: len(rec.events) == 2, what="second event")
    assert [n for _, n, _ in rec.events] == ["a", "b"]  # nothing twice, nothing lost
    assert w.lists == 1


def test_server_timeout_ends_stream_and_watch_resumes(fake, start_watcher):
    w, rec = start_watcher(timeout_seconds=1)
    wait_for(lambda: w.watches >= 2, timeout=5, what="a second watch after the timeout")
    fake.create("destinations", "apps", cr("late"))
    wait_for(lambda: rec.events, what="event after the resume")
    assert w.lists == 1
    assert "timeoutSeconds=1" in next(p for m, p in fake.requests if "watch=true" in p)


def test_410_in_the_middle_of_a_stream_lists_again(fake, start_watcher):
    fake.create("destinations", "apps", cr("a"))
    w, rec = start_watcher()
    fake.expire()
    wait_for(lambda: len(rec.lists) == 2 and fake.open_watches == 1, what="the re-list")
    assert w.gone == 1
    assert rec.lists == [["a"], ["a"]]
    fake.create("destinations", "apps", cr("b"))
    wait_for(lambda: rec.events, what="event after the re-list")
    assert rec.events[0][:2] == ("ADDED", "b")


def test_410_as_http_status_on_reconnect_lists_again(fake, start_watcher):
    w, rec = start_watcher()
    # the watch cannot reconnect for a while; meanwhile the history is compacted
    fault = fake.fault(r"watch=true", status=500, times=None)
    fake.close_watches()
    wait_for(lambda: w.errors >= 1, what="a failed reconnect")
    fake.create("destinations", "apps", cr("missed"))
    fake.expire_with_http_status = True
    fake.expire()
    fake.clear_faults()
    wait_for(lambda: len(rec.lists) == 2, what="the re-list")
    assert w.gone == 1
    assert rec.lists[-1] == ["missed"]
    assert fault.hits >= 1


def test_list_errors_are_retried(fake, start_watcher):
    fake.fault(r"/destinations$", method="GET", status=500, times=2)
    w, rec = start_watcher()
    assert w.errors == 2 and w.lists == 1


def test_stop_is_prompt_while_the_stream_is_idle(fake, start_watcher, in_reactor):
    w, rec = start_watcher(timeout_seconds=300)
    t0 = time.monotonic()
    in_reactor(w.stop)
    assert time.monotonic() - t0 < 2
    wait_for(lambda: not w.running, timeout=2, what="the thread to end")
    wait_for(lambda: fake.open_watches == 0, what="the server to see the stream closed")


def test_watch_with_label_selector(fake, start_watcher, reactor, in_reactor):
    api = KubeApi(k8s.ApiClient(fake.configuration()), timeout=5)
    rec = Recorder()
    w = Watcher(
        "pods", lambda: api.list("Pod", "gw", "app=mailgw"), lambda: api.watch_source("Pod", "gw", "app=mailgw"),
        rec.on_list, rec.on_event, reactor, timeout_seconds=30, min_backoff=0.05,
    )
    in_reactor(w.start)
    try:
        wait_for(lambda: fake.open_watches == 1, what="pod watch")
        fake.create("pods", "gw", {"metadata": {"name": "other", "labels": {"app": "x"}}})
        fake.create("pods", "elsewhere", {"metadata": {"name": "p0", "labels": {"app": "mailgw"}}})
        fake.create("pods", "gw", {"metadata": {"name": "p1", "labels": {"app": "mailgw"}}})
        fake.create("pods", "gw", {"metadata": {"name": "p2", "labels": {"app": "mailgw"}}})
        # One watch delivers in order: had "other" or "p0" come, they would precede p2.
        wait_for(lambda: len(rec.events) >= 2, what="pod events")
        assert [n for _, n, _ in rec.events] == ["p1", "p2"]
    finally:
        in_reactor(w.stop)
