"""Anchor search: the top k of N inner products behind ASIF, exact or refined int8.

Depends on nothing of the package but `collections.memory`; `models` and `serving` use it.
"""

from keras_clip_it.search.index import AnchorIndex
from keras_clip_it.search.index import checked_query
from keras_clip_it.search.index import follow
from keras_clip_it.search.refined import RefinedIndex

__all__ = ["AnchorIndex", "RefinedIndex", "checked_query", "follow"]
