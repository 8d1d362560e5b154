"""Settings of one studio process, filled from the CLI (`studio serve --help`)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 8000
LORA_MODES = ("auto", "on", "off")


def default_data_dir() -> Path:
    return Path(os.environ.get("STUDIO_DATA_DIR", "studio-data"))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Settings:
    data_dir: Path = field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # the served model's weights: a local Hugging Face folder instead of the packaged model (with
    # --backend-url: the fleet's model, for training and for the same-model check)
    model: Path | None = None
    model_name: str | None = None  # version name for --model / --backend-url
    # external OpenAI-compatible servers (comma-separated URLs) instead of our own vLLM
    backend_url: str | None = None
    # what the studio and the servers (training launchers, the external fleet) both see at the
    # same path: run outputs, and adapters loaded into external servers (default: the data dir)
    shared_dir: Path | None = None
    vllm_port: int | None = None  # the first managed vLLM's port (a replacement takes a free one)
    vllm_startup_timeout: float = 600.0
    # runtime LoRA in managed vLLM: "auto" serves without it until the first adapter version
    # exists (it costs sampling speed on the CPU), then switches without a failed request;
    # "on" always; "off" never (adapters are refused). True/False mean on/off.
    lora: str = "auto"
    max_servers: int = 2  # managed vLLM processes at once (each holds 4-5 GB here)
    watch_interval: float = 5.0  # seconds between looks at each model server
    # Measure the server's throughput against requests in flight at start (once per model and
    # server; the curve is kept in the data folder) and sample at its knee.
    probe: bool = True
    max_runs: int = 1  # training runs at once (each takes the CPU it can get)
    ui: bool = True
    auto_eval: bool = True  # evaluate every version a run registers against its parent
    # how the runner starts a stage (studio/launchers.py); a run may choose its own
    launcher: str = "local"  # local | accelerate | ray
    num_processes: int = 1  # processes per stage under accelerate (and ray with accelerate)
    accelerate_config: Path | None = None  # `accelerate launch --config_file` (GPUs, DeepSpeed, FSDP)
    ray_address: str | None = None  # the Ray cluster's Jobs address, e.g. http://HEAD:8265
    ray_gpus_per_process: float = 0.0  # GPUs a Ray job reserves per process (0: a CPU job)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.model is not None:
            self.model = Path(self.model)
        if self.shared_dir is not None:
            self.shared_dir = Path(self.shared_dir)
        if self.accelerate_config is not None:
            self.accelerate_config = Path(self.accelerate_config)
        from studio.launchers import check_launch_settings

        check_launch_settings(self.launcher, self.num_processes, self.accelerate_config, self.ray_address)
        if self.ray_gpus_per_process < 0:
            raise ValueError(f"--ray-gpus-per-process {self.ray_gpus_per_process}: use 0 or more")
        if self.max_runs < 1:
            raise ValueError(f"--max-runs {self.max_runs}: at least one training run must be able to run")
        self.shared_dir = Path(self.shared_dir) if self.shared_dir is not None else self.data_dir
        if isinstance(self.lora, bool):
            self.lora = "on" if self.lora else "off"
        if self.lora not in LORA_MODES:
            raise ValueError(f"--lora {self.lora}: expected one of {', '.join(LORA_MODES)}")
        if self.max_servers < 1:
            raise ValueError(f"--max-servers {self.max_servers}: at least the base needs a server")
        for url in self.backend_urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(
                    f"--backend-url {url}: expected the http(s) base URL of an OpenAI-compatible "
                    "server, such as http://gpu-1:8000 (several: comma-separated)"
                )

    @property
    def backend_urls(self) -> list[str]:
        return [
            u.strip().rstrip("/").removesuffix("/v1")
            for u in (self.backend_url or "").split(",")
            if u.strip()
        ]

    @property
    def db_path(self) -> Path:
        return self.data_dir / "studio.duckdb"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"
