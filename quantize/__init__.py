"""The KL-sensitivity mixed-precision quantizer: measure, allocate, apply."""

from .allocate import Allocation, allocate, hull_steps, module_points
from .apply import quantization_config, quantize_to_plan, stored_bytes, stored_plan
from .calibration import CalibrationData, load_calibration
from .modules import Grouping, Quantizable, quantizable_modules
from .sensitivity import Sensitivities, load_sensitivities, measure_sensitivities

__all__ = [
    "Allocation",
    "CalibrationData",
    "Grouping",
    "Quantizable",
    "Sensitivities",
    "allocate",
    "hull_steps",
    "load_calibration",
    "load_sensitivities",
    "measure_sensitivities",
    "module_points",
    "quantizable_modules",
    "quantization_config",
    "quantize_to_plan",
    "stored_bytes",
    "stored_plan",
]
