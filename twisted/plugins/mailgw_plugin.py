"""The ``twistd mailgw`` entry point.  (No __init__.py in twisted/ or twisted/plugins/.)"""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    synopsis = "[--config FILE | --demo | --kubernetes [--config FILE]]"
    optFlags = [
        ["demo", None, "Run with a built-in demo mail server on loopback."],
        ["kubernetes", None, "Cluster-wide gateway: watch Destination custom resources."],
    ]
    optParameters = [
        ["config", "c", None, "gateway.yaml (YAML or JSON)."],
    ]

    def postOptions(self):
        if not (self["demo"] or self["kubernetes"] or self["config"]):
            raise usage.UsageError("give --config FILE, --demo or --kubernetes")
        if self["demo"] and (self["config"] or self["kubernetes"]):
            raise usage.UsageError("--demo runs on its own; leave out --config and --kubernetes")


@implementer(IServiceMaker, IPlugin)
class MailgwServiceMaker:
    tapname = "mailgw"
    description = "mailgw: an SMTP/IMAP/POP3 gateway that logs in for your applications."
    options = Options

    def makeService(self, options):
        from twisted.internet import reactor

        if options["demo"]:
            from mailgw.demo import DemoService

            return DemoService(reactor)
        if options["kubernetes"]:
            from mailgw.kube.main import make_kubernetes_service  # noqa: PLC0415

            return _with_log_format(make_kubernetes_service(reactor, options["config"]), options)
        from mailgw.config import ConfigError, load_config
        from mailgw.service import make_service

        try:
            service = make_service(load_config(options["config"]), reactor)
        except ConfigError as e:
            # One clear line, no traceback: this is the operator's file, not our bug.
            raise SystemExit(f"mailgw: configuration error: {e}") from None
        return _with_log_format(service, options)


def _with_log_format(service, options):
    """gateway.yaml's ``logging.format`` for twistd: the observer that the service
    offers twistd's application when it becomes its child (see mailgw.logs)."""
    from mailgw.logs import twistd_observer

    service.log_observer = twistd_observer(service.logging.format, getattr(options, "parent", None))
    return service


serviceMaker = MailgwServiceMaker()
