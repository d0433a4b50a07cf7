"""Problem text -> chat messages -> templated prompt string (the VPPO recipe's format prompt)."""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"


def build_messages(problem: str, num_images: int, format_prompt: str) -> list[dict]:
    """One user turn: the problem with each `<image>` replaced by an image part, then the format instruction.

    A problem without placeholders gets its images in front of the text (the common convention of
    multimodal chat templates); a problem with placeholders must have exactly one per image.
    """
    problem = problem.strip()  # the reference's template renders `content | trim`
    text = f"{problem}\n\n{format_prompt}" if format_prompt else problem
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) == 1:
        pieces = [""] * num_images + [text]
    elif len(pieces) - 1 != num_images:
        raise ValueError(f"problem has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders but {num_images} images")
    content: list[dict] = []
    for i, piece in enumerate(pieces):
        if piece:
            content.append({"type": "text", "text": piece})
        if i < len(pieces) - 1:
            content.append({"type": "image"})
    return [{"role": "user", "content": content}]


def render_prompt(tokenizer, problem: str, num_images: int, format_prompt: str) -> str:
    """The chat-templated prompt string, ending with the assistant header (generation prompt)."""
    messages = build_messages(problem, num_images, format_prompt)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
