"""Build the tiny umT5-style tokenizer that the `tiny` presets ship instead of google/umt5-xxl.

The real Wan text encoder loads its tokenizer with `AutoTokenizer.from_pretrained(<folder>)` from the
`google/umt5-xxl` files (a SentencePiece Unigram model; pad 0, eos 1, unk 2). Tests and the no-GPU demo
cannot download those files, so the project writes its own small tokenizer of the same kind and the
tiny preset loads it through exactly the same `AutoTokenizer` path.

The tokenizer is a Unigram model trained with the `tokenizers` library on a small built-in corpus
(English and Chinese video prompts, digits, punctuation). It is saved as a `T5Tokenizer` (the
transformers class the umT5 files declare), which rebuilds the backend from the saved Unigram vocab
with T5's whitespace/metaspace pre-tokenizer and appends `</s>`. That class drops SentencePiece byte
fallback, so coverage comes from the alphabet instead: every printable ASCII character, common CJK
punctuation and a few hundred frequent Chinese characters are always in the vocab; any other character
becomes `<unk>` rather than an error.

Deterministic: training runs single-threaded, the vocab is put in a canonical order (see
`_canonical_vocab`), and the saved files carry no paths or timestamps, so building twice gives
byte-identical files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
"""The umT5 special tokens, in id order 0, 1, 2 (T5Tokenizer hard-codes unk id 2)."""

TINY_VOCAB_SIZE = 1024

_ENGLISH = """\
A cat walks slowly across a sunny garden, chasing a yellow butterfly between the flowers.
An orange cat is running in the park. The camera follows it from a low angle.
A golden retriever plays with a red ball on the beach at sunset, waves rolling behind it.
A busy city street at night, neon lights reflecting on wet asphalt, cars passing by.
Two astronauts float inside a space station, the Earth glowing blue through the window.
A close-up of a cup of coffee, steam rising, morning light coming through the kitchen window.
A young woman in a white dress dances in a field of sunflowers, her hair moving in the wind.
An old man reads a newspaper on a wooden bench under a large oak tree in autumn.
A drone shot flying over snowy mountains, clouds drifting below the peaks.
A small boat sails across a calm lake surrounded by green hills and tall pine trees.
Children laugh and run through a water fountain on a hot summer day.
A chef slices fresh vegetables on a cutting board in a modern restaurant kitchen.
A red sports car drives fast along a coastal road, the ocean sparkling on the right.
Rain falls on a quiet village street; a person with an umbrella walks past a bakery.
A panda eats bamboo in a forest, slowly chewing while looking at the camera.
A timelapse of clouds moving over a desert, shadows racing across the sand dunes.
A robot walks through a factory, sparks flying from the machines around it.
A cinematic shot of a horse galloping through tall grass, dust rising in the evening light.
A bird lands on a branch covered with cherry blossoms, petals falling in the breeze.
A train crosses a long bridge over a river valley, seen from far away.
Fireworks explode over the harbor at midnight, people cheering on the shore.
A girl paints a picture of the sea with blue and white colors, sitting by the window.
A fox jumps into deep snow, hunting for a mouse, in slow motion.
The waves crash against black rocks; white foam covers the shore.
A man plays the guitar on a street corner while people walk by and listen.
Soft light, shallow depth of field, realistic style, high quality, 4K, detailed.
Photorealistic, cinematic lighting, smooth camera motion, 16:9, 24 fps, 1080p.
Numbers and dates: 0 1 2 3 4 5 6 7 8 9, 10, 25, 100, 2024, 3.14, 50%, 12:30, #1, $20.
Punctuation: "quoted", 'single', (round), [square], {curly}, a/b, a-b, a_b, a+b=c, a*b, a<b>c, a|b, a~b, @home, a&b, a^2, `code`, a;b, a:b, wow!, why?, \\path.
"""

_CHINESE = """\
一只橙色的猫在花园里追逐蝴蝶，阳光明媚，花朵盛开。
一只小狗在海边奔跑，海浪拍打着沙滩，远处是美丽的日落。
夜晚的城市街道，霓虹灯闪烁，汽车在雨中缓缓驶过。
两名宇航员在空间站里漂浮，窗外是蓝色的地球。
一位年轻的女孩穿着白色的长裙，在向日葵花田中跳舞，长发随风飘动。
一位老人坐在公园的长椅上看报纸，秋天的树叶慢慢落下。
无人机飞过白雪覆盖的高山，云层在山峰下方流动。
一条小船在平静的湖面上航行，四周是绿色的山和高大的松树。
孩子们在夏天的喷泉里奔跑嬉戏，发出欢快的笑声。
厨师在现代化的厨房里切新鲜的蔬菜，动作又快又准。
一辆红色的跑车沿着海岸公路高速行驶，右边是闪闪发光的大海。
细雨落在安静的小镇街道上，一个人撑着雨伞走过面包店。
大熊猫在竹林里吃竹子，一边慢慢咀嚼一边看着镜头。
延时摄影：云朵在沙漠上空移动，影子在沙丘上飞快掠过。
机器人走过工厂，周围的机器冒出火花。
一匹马在高高的草地上奔驰，傍晚的光线中尘土飞扬。
一只鸟落在开满樱花的树枝上，花瓣在微风中飘落。
火车穿过河谷上的长桥，从远处看去非常壮观。
午夜的港口上空烟花绽放，岸边的人们欢呼。
一个女孩坐在窗边，用蓝色和白色画大海。
狐狸跳进厚厚的雪里捕捉老鼠，慢动作镜头。
海浪拍打黑色的岩石，白色的泡沫覆盖了海岸。
一个男人在街角弹吉他，行人停下来听他唱歌。
柔和的光线，浅景深，写实风格，高质量，细节丰富，电影感，镜头平稳移动。
色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量。
JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的。
形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走。
"""

_CJK_PUNCTUATION = "，。、；：？！“”‘’（）《》【】…—～·「」『』〈〉"

_COMMON_HANZI = (
    "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生自会那后能对着事其"
    "里所去行过家十用发天如然作方成者多日都三小军二无同么经法当起与好看学进种将还分此心前面又定见只主没公从"
    "已现动两长知民样实向把内开意问很最重并物手应战气理本情全相机制外间果走第高正新头比先力想把做路同次因"
    "电加书名真美山水光车火风云雨雪花草树木鸟鱼马牛羊猫狗虫龙虎熊猴兔鸡鸭海河湖江河岸沙石土林森田园街城市"
    "村房门窗桌椅床灯衣服鞋帽红黄蓝绿白黑紫灰金银色彩亮暗明清快慢远近左右前后上下东南西北春夏秋冬早晚夜晨"
    "昨今阳月星空天地人身体头脸眼耳口鼻手脚发心笑哭跑跳走飞游唱跳舞画写读听说吃喝睡坐站看望拿放打开关门"
    "男女老少孩儿童爸妈哥姐弟妹朋友师生医工农兵学校班课字词句歌声音乐影视片镜景观拍摄照相动画视频高清晰"
    "大小多少长短高低胖瘦美丑好坏冷热新旧真假快乐悲伤安静热闹温柔强弱轻重深浅宽窄干湿软硬圆方平直弯尖"
    "飘落流动吹转追逐穿越漂浮盛开闪烁奔驰掠过拍打覆盖欢呼燃烧旋转升起降落照耀反射倒映波浪泡沫尘埃烟雾"
    "橙蝴蝶蜂蚁叶枝根果实种子竹松樱桃苹梨葡萄西瓜蛋糕面包咖啡茶牛奶饭菜肉汤盘碗杯瓶刀叉筷勺锅"
    "船舟桥塔楼宫殿庙寺墙院场店馆站港口岛峰谷原野沙漠草原冰川瀑布溪泉洞穴森林丛竹海滩礁岩浪潮汐"
    "宇宙太空航员飞船星球银河卫地球火箭机器人工厂火花电脑手机网络屏幕键盘相机镜头灯光阴影轮廓"
    "质量细节模糊清楚写实风格电影感高级精致丰富柔和自然艳丽过曝静态字幕作品画作面整体最差低压缩残留丑陋"
    "缺余指融合形畸毁容肢条腿背景很倒着杂乱部部分"
)


def _corpus() -> list[str]:
    """The training lines: prose for the multi-character pieces, then the bare alphabets."""
    lines = [ln for ln in (_ENGLISH + _CHINESE).splitlines() if ln.strip()]
    lines.append(" ".join(_CJK_PUNCTUATION))
    lines.append(_COMMON_HANZI)
    return lines


def _alphabet() -> list[str]:
    """Characters that are always single-character pieces, so no ASCII or common CJK text hits <unk>."""
    ascii_chars = [chr(c) for c in range(0x21, 0x7F)]  # printable ASCII except space (space is ▁)
    seen: dict[str, None] = {}
    for ch in ascii_chars + list(_CJK_PUNCTUATION) + list(_COMMON_HANZI):
        seen.setdefault(ch, None)
    return list(seen)


def _train_unigram(vocab_size: int) -> list[tuple[str, float]]:
    """Train the Unigram model single-threaded and return its (piece, log-prob) vocab, specials first."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer

    tokenizer = Tokenizer(Unigram())
    # The same pre-tokenization T5Tokenizer applies at load time, so the trained pieces fit it.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    trainer = UnigramTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        special_tokens=[PAD, EOS, UNK],
        unk_token=UNK,
        initial_alphabet=_alphabet(),
        max_piece_length=8,
    )
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    vocab = [(piece, float(score)) for piece, score in json.loads(tokenizer.to_str())["model"]["vocab"]]
    return _canonical_vocab(vocab, n_required=len(set(_alphabet()) | set("".join(_corpus()))))


def _canonical_vocab(vocab: list[tuple[str, float]], n_required: int) -> list[tuple[str, float]]:
    """Make the trained vocab independent of hash-set iteration order.

    The trainer re-inserts required characters that EM pruned with scores min_score + k * 1e-4, k
    counting in the (unordered) iteration order of a hash set, so which character gets which k varies
    from run to run. Every score in that band [min_score, min_score + n_required * 1e-4] is set to
    min_score (the band is under 0.1 nats wide, so segmentation barely changes), then the pieces are
    ordered by score and text after the specials.
    """
    specials, pieces = vocab[:3], vocab[3:]
    floor = min(score for _, score in pieces)
    band_top = floor + n_required * 1e-4 + 1e-9
    # Rounded before sorting: the EM sums may differ in their last bits between runs.
    canonical = [(piece, round(floor if score <= band_top else score, 6)) for piece, score in pieces]
    canonical.sort(key=lambda item: (-item[1], item[0]))
    return [(piece, 0.0) for piece, _ in specials] + canonical


def build_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = TINY_VOCAB_SIZE) -> Path:
    """Train the tiny tokenizer and save it under `out_dir` so `AutoTokenizer.from_pretrained(out_dir)`
    loads it (as a `T5Tokenizer`: pad "<pad>"=0, eos "</s>"=1, unk "<unk>"=2, `</s>` appended).

    `vocab_size` counts every token including the three specials; the corpus is large enough that the
    trained vocab reaches it exactly (checked here, because the tiny text encoder's embedding table is
    sized from the same number). Returns the folder.
    """
    from transformers import T5Tokenizer

    vocab = _train_unigram(vocab_size)
    if len(vocab) != vocab_size:
        raise ValueError(
            f"the built-in corpus yields {len(vocab)} pieces, not the requested vocab_size {vocab_size}"
        )
    if [piece for piece, _ in vocab[:3]] != [PAD, EOS, UNK]:
        raise AssertionError(f"special tokens out of order: {vocab[:3]}")
    tokenizer = T5Tokenizer(vocab=vocab, pad_token=PAD, eos_token=EOS, unk_token=UNK, extra_ids=0)
    tokenizer.model_max_length = 512
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return out
