"""Chat templates a recipe can select by name (``chat_template: chatml``), as in mergekit.

The names are mergekit's (``chatml``, ``llama3``, ``alpaca``, ``mistral``, ``exaone``); each template is
written here for the conversation format the name stands for (the format is what matters: a model trained on
ChatML expects ``<|im_start|>role\\n…<|im_end|>\\n`` turns).
"""

from __future__ import annotations

CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{% for m in messages %}"
        "{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{% if system %}{{ system[-1]['content'] | trim + '\\n\\n' }}{% endif %}"
        "{% for m in messages if m['role'] != 'system' %}"
        "{% if m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] | trim }}"
        "{% elif m['role'] == 'user_context' %}{{ '### Input:\\n' + m['content'] | trim }}"
        "{% else %}{{ '### Response:\\n' + m['content'] | trim }}{% endif %}"
        "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
        "{{ '\\n\\n### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
        "{{ bos_token }}"
        "{% for m in turns %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('after an optional system message, roles must alternate user/assistant') }}"
        "{% endif %}"
        "{% if m['role'] == 'user' %}"
        "{% set text = system + '\\n\\n' + m['content'] if (loop.first and system) else m['content'] %}"
        "{{ ' [INST] ' + text + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "exaone": (
        "{% for m in messages %}"
        "{% if loop.first and m['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
        "{{ '[|' + m['role'] + '|]' + m['content'] }}"
        "{% if m['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}
