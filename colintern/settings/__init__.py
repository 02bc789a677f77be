"""The settings of ColIntern's runs, one frozen dataclass per concern (colintern/cli.py says how they become
flags). A command's settings class is the concerns it needs, e.g.

    TrainConfig = model + data + single-vector + optimisation + LoRA + hardware + checkpoints and logs

From Python:

    from colintern.settings import TrainConfig
    from colintern.train.trainer import train
    summary = train(TrainConfig(model_id="OpenGVLab/InternVL3_5-1B-Instruct", train_hub="vidore/colpali_train_set",
                                lora=True, out_dir="outputs/train"))

The field names are the flags' names (and the names old checkpoints record their phase arguments under). One
module per command family: common, train, itr, mine, eval, search, tools. No torch here.
"""
from colintern.settings.common import (DTYPES, MAX_DPI, ModelOptions, CheckpointOptions, DeviceOptions, LogOptions)
from colintern.settings.train import (task_flag, TrainDataOptions, SingleVectorOptions, OptimOptions, LoraOptions,
                                      TrainHardwareOptions, TrainOutputOptions,
                                      TrainConfig)
from colintern.settings.itr import (ITR_STAGES, ITR_LOSS_WEIGHTS, CocoOptions, ItrHeadOptions, ItrTrainConfig)
from colintern.settings.mine import (MineDataOptions, MineOutputOptions, FirstStageOptions, MiningOptions,
                                     MineComputeOptions, MineConfig)
from colintern.settings.eval import (DEFAULT_BENCHMARK, PoolOptions, BenchmarkOptions, ItrEvalOptions, EvalConfig)
from colintern.settings.search import (RenderOptions, IndexFolderOptions, QdrantOptions, SearchSettings,
                                       SearchOutputOptions, IndexConfig,
                                       QueryConfig, ExportConfig, InfoConfig,
                                       RemoveConfig, CompactConfig,
                                       VerifyConfig, ExportModelConfig, ServeConfig,
                                       SEARCH_COMMANDS)
from colintern.settings.tools import (SyntheticOptions, DatasetConfig, SyntheticConfig, ScenesConfig, TinyConfig,
                                      SanityConfig, DemoConfig, AblateConfig,
                                      ItrDemoConfig, ReportOptions,
                                      CompareConfig, EfficiencyConfig,
                                      PlotLossConfig, PLOT_METRICS,
                                      PlotMetricsConfig)

__all__ = [
    "DTYPES", "MAX_DPI", "ModelOptions", "CheckpointOptions", "DeviceOptions", "LogOptions", "task_flag",
    "TrainDataOptions", "SingleVectorOptions", "OptimOptions", "LoraOptions", "TrainHardwareOptions",
    "TrainOutputOptions", "TrainConfig", "ITR_STAGES", "ITR_LOSS_WEIGHTS", "CocoOptions", "ItrHeadOptions",
    "ItrTrainConfig", "MineDataOptions", "MineOutputOptions", "FirstStageOptions", "MiningOptions",
    "MineComputeOptions", "MineConfig", "DEFAULT_BENCHMARK", "PoolOptions", "BenchmarkOptions", "ItrEvalOptions",
    "EvalConfig", "RenderOptions", "IndexFolderOptions", "QdrantOptions", "SearchSettings", "SearchOutputOptions",
    "IndexConfig", "QueryConfig", "ExportConfig", "InfoConfig", "RemoveConfig", "CompactConfig", "VerifyConfig",
    "ExportModelConfig", "ServeConfig", "SEARCH_COMMANDS", "SyntheticOptions", "DatasetConfig", "SyntheticConfig", "ScenesConfig",
    "TinyConfig", "SanityConfig", "DemoConfig", "AblateConfig", "ItrDemoConfig", "ReportOptions", "CompareConfig",
    "EfficiencyConfig", "PlotLossConfig", "PLOT_METRICS", "PlotMetricsConfig"
]
