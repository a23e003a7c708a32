"""The slide's item on Girder that results are posted to: checked before anything is posted, then listed,
searched for a post's own documents and cleaned up (for :mod:`cellrcnn.girder_post` and
:mod:`cellrcnn.annotation_upload`).
"""

from .girder_api import server_message

#: the attribute holding a post's key ``{post id}/{index}/{count}``, on every document a post creates
POST_KEY = 'cellrcnn_post'
#: the REST path of cellrcnn's Girder plugin for an item (``girder_cellrcnn.rest``)
PLUGIN_ITEM = 'cellrcnn/item'


class Target:
    """The checked destination: the user, the slide's item and its image file."""

    def __init__(self, server, item_id):
        self.server = server
        if not isinstance(item_id, str) or not item_id.strip():
            raise server.fail('no Girder item id given: give the id of the slide\'s item')
        item_id = item_id.strip()
        self.user_id = server.user(' and post again')['_id']
        self.item = server.slide_item(item_id)
        self.item_id = self.item['_id']
        name = self.item.get('name')
        large = self.item.get('largeImage') or {}
        if large.get('expected'):
            raise server.fail(f'item {self.item_id} ({name}) is still being converted to a large image; post '
                              'again when it is done')
        from girder_client import HttpError
        try:
            server.get('checking that the item is an image', f'item/{self.item_id}/tiles', item_id=self.item_id,
                       passthrough=(400, 404))
        except HttpError as exc:
            raise server.fail(f'item {self.item_id} ({name}) is not a large image that Girder can tile '
                              f'({server_message(exc)}): post to the slide\'s item') from None
        self.file_id = large.get('fileId')

    def annotations(self):
        return self.server.get('listing the item\'s annotations', 'annotation',
                               {'itemId': self.item_id, 'limit': 0, 'sort': 'created', 'sortdir': 1},
                               item_id=self.item_id)

    def writers_annotations(self):
        """The ids of the item's cellrcnn annotations that the server's cellrcnn plugin counts as results (made by
        writers of the item: ``GET /cellrcnn/item/{id}/results``), or None when the server has no such plugin."""
        from girder_client import HttpError

        try:
            return set(self.server.get('asking which annotations count as results',
                                       f'{PLUGIN_ITEM}/{self.item_id}/results', item_id=self.item_id,
                                       passthrough=(400, 404)))
        except HttpError:
            return None

    def mine(self, annotation):
        """Whether this user made the annotation (a post's own documents are those carrying its id made by it)."""
        return annotation.get('creatorId') == self.user_id

    def posted(self, key):
        """The ids of the annotations on the item that carry the post key ``key`` and were made by this user."""
        return [a['_id'] for a in self.annotations() if post_key(a) == key and self.mine(a)]

    def find(self, key):
        """The id of the annotation that this user's post ``key`` created on the item, or None."""
        return next(iter(self.posted(key)), None)

    def delete(self, annotation_id):
        """Delete an annotation from the item (one already gone is no error)."""
        from girder_client import HttpError

        try:
            self.server.call(f'deleting the earlier annotation {annotation_id}',
                             lambda: self.server.gc.delete(f'annotation/{annotation_id}'), item_id=self.item_id,
                             passthrough=(400, 404))
        except HttpError:
            pass  # already gone


def annotation_attributes(annotation):
    """An annotation's ``attributes`` as Girder lists it (empty when it has none)."""
    return (annotation.get('annotation') or {}).get('attributes') or {}


def post_key(annotation):
    """The post key (``POST_KEY``) an annotation carries, or None."""
    return annotation_attributes(annotation).get(POST_KEY)
