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
        ["config", "c", None, "gateway.yaml (YAML or JSON).  SIGHUP re-reads it (standalone mode)."],
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

        from mailgw.config import ConfigError
        from mailgw.listening import StartupError
        from mailgw.process import ConfigReloader, GatewayProcess, exit_with, ignore_hangup

        parent = getattr(options, "parent", None)
        daemon = parent is not None and not parent["nodaemon"]
        try:
            if options["demo"]:
                from mailgw.demo import DemoService

                child = DemoService(reactor)
                on_hangup = ignore_hangup("the demo has no configuration file to re-read")
            elif options["kubernetes"]:
                child = self._kubernetes(reactor, options["config"])
                on_hangup = ignore_hangup(
                    "Kubernetes mode takes its destinations from the cluster; restart the pod to apply a changed gateway.yaml"
                )
            else:
                from mailgw.config import load_config
                from mailgw.service import make_service

                child = make_service(load_config(options["config"]), reactor)
                on_hangup = ConfigReloader(options["config"], child)
        except ConfigError as e:
            # One clear line, no traceback: this is the operator's file, not our bug.
            exit_with(f"mailgw: configuration error: {e}")
        except StartupError as e:
            exit_with(f"mailgw: {e}")
        process = GatewayProcess(child, reactor, on_hangup, daemon=daemon)
        _with_log_format(process, child, parent)
        return process

    @staticmethod
    def _kubernetes(reactor, config_path):
        from kubernetes.config import ConfigException

        from mailgw.kube.main import make_kubernetes_service  # noqa: PLC0415
        from mailgw.process import exit_with

        try:
            return make_kubernetes_service(reactor, config_path)
        except ConfigException as e:  # no in-cluster service account and no kubeconfig
            exit_with(f"mailgw: Kubernetes API configuration: {e}")


def _with_log_format(process, child, server_options):
    """gateway.yaml's ``logging.format`` for twistd: the observer that the process
    service offers twistd's application when it becomes its child (see mailgw.logs)."""
    from mailgw.config import LoggingConfig
    from mailgw.logs import twistd_observer

    log_format = getattr(child, "logging", LoggingConfig()).format  # the demo has none
    process.log_observer = twistd_observer(log_format, server_options)


serviceMaker = MailgwServiceMaker()
