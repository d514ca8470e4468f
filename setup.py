"""GranViT: a fine-grained, region-aware vision encoder trained through an LLM (arXiv 2510.21501).

The repository root *is* the ``granvit`` package: the Hub files (``*_granvit.py``: configuration, modeling,
processing, image processing and the modules they import) sit at the top so they can be copied verbatim into every
checkpoint, and ``train/``, ``eval/``, ``spaces/`` are its sub-packages.
"""
from setuptools import find_packages, setup

# torch==2.14.1 / torchvision==0.29.1 install from local files on the project machines; every range
# below admits them, so pip never reaches for a multi-GB CUDA wheel from the index.
BASE = [
    "torch>=2.4,<=2.14.1",
    "torchvision>=0.19,<=0.29.1",
    "transformers>=5.20,<6",
    "tokenizers>=0.22",
    "safetensors>=0.4",
    "huggingface-hub>=1.0,<3",
    "pillow>=10",
    "numpy>=1.24",
    "tqdm>=4.66",
    "pyyaml>=6",
]
EXTRAS = {
    # scikit-learn + threadpoolctl: the region probe (eval/probe.py) the main job and granvit-parts report.
    # trl: train/trl_stages.py overrides no private trl method (only training_step / prediction_step, the config and
    # the trainer's public attributes ref_model / beta), so no upper bound; tests/test_trl_stages.py pins the behaviour.
    "train": ["datasets>=5,<6", "accelerate>=1.10", "peft>=0.17", "trl>=1.10", "matplotlib>=3.8", "pyarrow>=18",
              "scikit-learn>=1.3", "threadpoolctl>=3"],
    "eval": ["datasets>=5,<6", "evaluate>=0.4.6", "pycocoevalcap>=1.2", "matplotlib>=3.8", "scikit-learn>=1.3",
             "threadpoolctl>=3"],
    "demo": ["gradio>=6.14,<7", "gradio_client>=2", "gradio_image_annotation==0.5.6"],
    # filelock 4 breaks lmms-eval 0.7.3's simple_evaluate (ModuleNotFoundError: filelock._api).
    "lmms": ["lmms-eval==0.7.3", "filelock<4"],
    # ZeRO-2/3 launches (train/configs/accelerate/); on CPU it runs over gloo, which the resume test uses.
    "deepspeed": ["deepspeed>=0.16"],
    # experiments/: the linear probe and the statistics over seeds; it trains with the quickstart recipe, so it is
    # installed with the train extra: pip install -e ".[train,eval,experiments]".
    "experiments": ["scikit-learn>=1.3", "threadpoolctl>=3", "scipy>=1.10", "matplotlib>=3.8"],
    # granvit-data annotate's embedded OCR: PP-OCRv4 det + rec ONNX models inside the wheel, offline, CPU. It pulls
    # opencv-python (needs libGL); on a bare server swap it for opencv-python-headless (same cv2 module). No wheel
    # for Python >= 3.13: there, use --ocr-engine transformers.
    "annotate": [
        "datasets>=5,<6", "accelerate>=1.10", "matplotlib>=3.8", "pyarrow>=18",
        "rapidocr-onnxruntime==1.4.4; python_version < '3.13'",
    ],
}
# psutil: bench/ (measurements in the repository, not installed with the package).
EXTRAS["dev"] = sorted({d for v in EXTRAS.values() for d in v} | {"pytest>=8", "playwright>=1.50", "psutil>=5.9"})

setup(
    name="granvit",
    version="0.1.0",
    description="GranViT: fine-grained region-aware vision encoders for multimodal LLMs, Hub-native",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    package_dir={"granvit": "."},
    packages=["granvit"] + [f"granvit.{p}" for p in find_packages(include=["train*", "eval*", "spaces*", "hub*", "experiments*"])],
    package_data={
        "granvit": [
            "train/configs/*.yaml",
            "pretrained_parts/parts.json",
            "pretrained_parts/*/*",
            "train/configs/accelerate/*",
            "eval/lmms_tasks/*.yaml",
            "eval/lmms_tasks/*.py",
            "eval/evaluate_metrics/*/*.py",
            "spaces/README.md",
            "spaces/requirements.txt",
        ]
    },
    install_requires=BASE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "granvit-build=granvit.train.build:main",
            "granvit-data=granvit.train.data.cli:main",
            "granvit-train=granvit.train.cli:main",
            "granvit-quickstart=granvit.train.quickstart:main",
            "granvit-parts=granvit.train.parts.cli:main",
            "granvit-eval=granvit.eval.run:main",
            "granvit-push=granvit.hub.publish:main",
            "granvit-export-encoder=granvit.hub.export_encoder:main",
            "granvit-demo=granvit.spaces.app:main",
        ],
        "lmms_eval.models": ["granvit = granvit.eval.lmms_eval_granvit:MANIFEST"],
    },
)
