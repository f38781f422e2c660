"""Anchor search: the top k of N inner products behind ASIF, behind one interface (`AnchorSearch`).

Exact (`AnchorIndex`: bfloat16 screening, certified, rescored against float32 / float16 / int8 anchors)
or refined int8 (`RefinedIndex`: int8 in memory, float32 rows read for a few candidates). `follow` keeps
any of them in step with its collection. Depends on nothing of the package but `collections`; `models`
and `serving` use it.
"""

from keras_clip_it.search.base import AnchorSearch
from keras_clip_it.search.base import checked_query
from keras_clip_it.search.base import follow
from keras_clip_it.search.exact import AnchorIndex
from keras_clip_it.search.refined import RefinedIndex

__all__ = ["AnchorIndex", "AnchorSearch", "RefinedIndex", "checked_query", "follow"]
