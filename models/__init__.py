"""The CNNs the paper analyses (CIFAR ResNet-18 and VGG-11), their training and their activations.

Example::

    import jax, models
    model = models.build_model("resnet18", num_classes=10)
    result = models.train(model, x_train, y_train, x_test, y_test, models.TrainConfig(), seed=0)
    acts = models.capture_activations(model, result.variables, x_test[:100],
                                      models.DEFAULT_LAYERS["resnet18"])

``models.train`` is the training function, which hides the module of the same name as an
attribute of the package; reach the module's other names with ``from models.train import ...``.
"""
from models.capture import (DEFAULT_LAYERS, LAYERS, activation_function, build_model, capture_activations, capture_paths,
                            check_non_negative, inference_kwargs, init_variables, layer_paths, model_spec,
                            rebuild_model)
from models.resnet import ResNet, ResNet18, TinyResNet18
from models.train import TrainConfig, TrainResult, load_model, save_model, train
from models.vgg import VGG, VGG11, Conv3x3, TinyVGG11

__all__ = [
    "DEFAULT_LAYERS",
    "LAYERS",
    "Conv3x3",
    "ResNet",
    "ResNet18",
    "TinyResNet18",
    "TinyVGG11",
    "TrainConfig",
    "TrainResult",
    "VGG",
    "VGG11",
    "activation_function",
    "build_model",
    "capture_activations",
    "capture_paths",
    "check_non_negative",
    "inference_kwargs",
    "layer_paths",
    "init_variables",
    "load_model",
    "model_spec",
    "rebuild_model",
    "save_model",
    "train",
]
