"""Where the variables can live: each operand digit's token, and the last token (where the answer is read)."""

from experiments.token_positions import TokenPosition, char_span_token_indices, last_token_position

from .causal_models import DIGITS


def token_positions(pipeline, settings) -> list[TokenPosition]:
    """The digit at character 0, 1, 3, 4 of "58+67=" (tokens found from character offsets), then the last token."""
    def at(char):
        return lambda setting: char_span_token_indices(pipeline, setting, char, char + 1)

    return [*(TokenPosition(at(c), pipeline, id=d) for c, d in zip((0, 1, 3, 4), DIGITS)), last_token_position(pipeline)]
