"""Watch contained agents: process, network and GPU telemetry feeding the watcher."""
