"""keras-clip-it plugin: analogy collections from RSS/Atom news feeds with images, kept up to date.

By default "news-it" reads la Repubblica's front-page feed; a TOML file configures any feeds (see the
README). `update(collection, "news-it")` adds the new items and removes those past the window, which is
how an ASIF model follows the news in seconds, with no training.
"""

import keras_clip_it
from keras_clip_it.collections import CollectionSpec

from keras_clip_it_news.feeds import FeedError  # noqa: F401
from keras_clip_it_news.feeds import FeedItem  # noqa: F401
from keras_clip_it_news.feeds import parse_feed  # noqa: F401
from keras_clip_it_news.news import NewsSource  # noqa: F401
from keras_clip_it_news.news import UpdateReport  # noqa: F401
from keras_clip_it_news.news import news_pairs
from keras_clip_it_news.news import sources
from keras_clip_it_news.news import update  # noqa: F401


@keras_clip_it.hookimpl
def register_collections(register):
    for source in sources():
        register(
            CollectionSpec(
                name=source.name,
                language=source.language,
                pairs=lambda source=source: news_pairs(source),
                description=source.description,
                source=", ".join(source.feeds),
                licence="the publishers' terms: headlines and photos for personal, non-commercial use",
            )
        )
