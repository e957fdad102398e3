"""Fencing: a write is made only while the leadership it began under lasts, checked in
the worker right before each request (not when the write was queued).

The controller runs offline (kubetest.offline_controller): a worker pool the test drives
by hand and an API that records every call, so the moment leadership ends can be placed
exactly between a write being queued and being sent."""

from __future__ import annotations

import copy

import pytest
from twisted.internet.defer import Deferred

from kubetest import RecordingApi, offline_controller
from mailgw.kube.apply import apply_changes
from mailgw.kube.client import KubeApiError
from mailgw.kube.model import parse_cr
from mailgw.kube.reconcile import SERVICE, Change


@pytest.fixture
def harness():
    controller, control, api = offline_controller()
    return controller, control, api, parse_cr(controller.crs.get(("apps", "mymail")))


def test_status_and_events_queued_under_a_leadership_that_then_ends_are_not_sent(harness):
    controller, control, api, cr = harness
    done = Deferred.fromCoroutine(controller._reconcile_as_leader(cr, controller.epoch))
    control.run_next()  # the objects: NetworkPolicy, Service, EndpointSlice
    assert [c[1] for c in api.writes()] == ["NetworkPolicy", "Service", "EndpointSlice"]
    assert control.calls, "the status and the Event wait for a worker"
    controller._set_leading(False)  # leadership ends while they wait
    while control.calls:
        control.run_next()
    assert [c[1] for c in api.writes()] == ["NetworkPolicy", "Service", "EndpointSlice"]
    assert done.called


def test_a_create_that_meets_our_own_object_patches_it_only_while_the_fence_holds():
    api = RecordingApi()
    leading = [True]
    body = {"metadata": {"name": "mymail", "labels": {"app.kubernetes.io/managed-by": "mailgw",
                                                       "mailgw.io/destination-uid": "uid-1"}}}

    def conflict(kind, namespace, b):
        api.calls.append(("create", kind, namespace, "mymail"))
        raise KubeApiError("create Service apps/mymail: 409 AlreadyExists", 409, "AlreadyExists")

    def found(kind, namespace, name):
        leading[0] = False  # leadership ends while the create's fallback reads the object
        return body

    api.create, api.on_get = conflict, found
    result = apply_changes(api, [Change("create", SERVICE, "apps", "mymail", body)], lambda: leading[0])
    assert result.fenced and ("patch", SERVICE, "apps", "mymail") not in api.calls


def test_each_write_answer_reaches_the_cache_before_the_next_write():
    """The answers used to reach the caches only once the whole plan was written, so the
    watch echoes of the first writes, arriving meanwhile, queued the CR once more."""
    controller, control, api = offline_controller()
    cr = parse_cr(controller.crs.get(("apps", "mymail")))
    cached_before = {}
    create = api.create

    def create_noting_the_cache(kind, namespace, body):
        cached_before[kind] = (len(controller.policy_store), len(controller.service_store))
        return create(kind, namespace, body)

    api.create = create_noting_the_cache
    Deferred.fromCoroutine(controller._reconcile_as_leader(cr, controller.epoch))
    control.run_next()
    assert cached_before["Service"] == (1, 0) and cached_before["EndpointSlice"] == (1, 1)


def test_a_reconcile_with_nothing_to_write_does_not_wait_for_a_worker():
    controller, control, api = offline_controller()
    cr = parse_cr(controller.crs.get(("apps", "mymail")))
    Deferred.fromCoroutine(controller._reconcile_as_leader(cr, controller.epoch))
    while control.calls:
        control.run_next()
    cr = parse_cr(controller.crs.get(("apps", "mymail")))  # as the status write left it
    again = Deferred.fromCoroutine(controller._reconcile_as_leader(cr, controller.epoch))
    assert again.called and control.calls == []


@pytest.mark.parametrize("edited, runs", [(False, 1), (True, 2)])
def test_the_echo_of_a_reconciles_own_write_does_not_queue_it_again(edited, runs):
    """The watch event of a write may come before the write's answer: it is the write's
    echo (one reconcile) when it carries the answer's version; someone else's change
    made meanwhile (another version) still queues the CR again."""
    controller, control, api = offline_controller()
    controller._synced[("everything", None)] = True  # the initial lists are in: the queue runs
    started = []
    reconcile = controller._reconcile

    async def counted(key, *args):
        started.append(key)
        return await reconcile(key, *args)

    controller._reconcile = counted
    create = api.create

    def create_and_echo_first(kind, namespace, body):
        answer = create(kind, namespace, body)
        if kind == "Service":
            event = copy.deepcopy(answer)
            if edited:
                event["metadata"]["resourceVersion"] = str(api.version + 50)
                event["metadata"]["labels"]["edited"] = "yes"
            controller._event("services", controller.service_store, "MODIFIED" if edited else "ADDED", event)
        return answer

    api.create = create_and_echo_first
    controller.enqueue(("apps", "mymail"))
    while control.calls:
        control.run_next()
    assert started == [("apps", "mymail")] * runs and not controller.queue.busy
