"""clipleak: how much do CLIP federated-learning updates leak about a client's images?"""

__version__ = "0.1.0"
