"""Datasets (numpy only): procedural referring scenes and the gRefCOCO loader.

``synth`` writes gRefCOCO-format data; ``grefcoco`` reads real or synthetic gRefCOCO.
"""

from gsva_ros.data.grefcoco import GRefCOCOError, RefSample, group_by_image, load_grefcoco

__all__ = ["GRefCOCOError", "RefSample", "group_by_image", "load_grefcoco"]
