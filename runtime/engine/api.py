"""The engine's public names in one place (AttentionEngine's own spelling):

    from attnrt.engine.api import AttentionEngine, OnlineFunc, CustomIO, SymbolScalar, Var

Shapes: q [B, N, H, D], k [B, M, Hkv, D], v [B, M, Hkv, Dv] -> out [B, N, H, Dv].
"""

from attnrt.engine.errors import EngineError, EngineInputError, TraceError
from attnrt.engine.library import AttentionLibrary
from attnrt.engine.online import OnlineIdentity, OnlineRetention, OnlineSoftmax
from attnrt.engine.softmax import AttentionEngine
from attnrt.engine.spec import CustomIO, OnlineFunc, SymbolScalar, Var, meta_tensor

__all__ = ["AttentionEngine", "AttentionLibrary", "CustomIO", "EngineError", "EngineInputError",
           "OnlineFunc", "OnlineIdentity", "OnlineRetention", "OnlineSoftmax", "SymbolScalar",
           "TraceError", "Var", "meta_tensor"]
