"""Small saturating preference tasks for ARM training experiments (bench/train_experiments.py, the README's
"Your own preference"): a few dozen TRL pairs whose chosen and rejected responses differ by one easy feature, the
kind of data a user brings, and held-out prompts with a judge that tells whether a continuation shows the feature.

    sky   — prompts end at "the sky"; chosen: "... turned orange and pink", rejected: "... changed" (the data of
            issue 13). Feature: the continuation names a colour.
    rain  — prompts set out on a trip; chosen replies have it start to rain, rejected ones mention no weather.
            Feature: rain, a storm or a shower. (A topic.)
    brief — chat questions; chosen answers are one short sentence, rejected ones a long winding one.
            Feature: the reply's first sentence ends within BRIEF_WORDS words. (A style: length.)
    kind  — openings of reviews; chosen continuations praise, rejected ones complain.
            Feature: VADER compound ≥ KIND_VADER. (A sentiment.)

Everything is generated from fixed word lists and a seed: no download, no model.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    feature: str  # what the judge looks for, in words
    pairs: list[dict]  # TRL rows {prompt, chosen, rejected}
    held_out: list[str]  # prompts never used in the pairs
    has_feature: Callable[[str], bool]


COLOURS = re.compile(
    r"\b(red|orange|pink|purple|violet|gold|golden|yellow|crimson|scarlet|blue|grey|gray|silver|amber|rosy|"
    r"indigo|green|black|white|copper|bronze|lavender|magenta|peach|coral)\b",
    re.IGNORECASE,
)
RAIN = re.compile(
    r"\b(rain|rained|raining|rainy|raindrops?|drizzle|drizzling|storms?|stormy|showers?|downpour|thunder|umbrellas?)\b",
    re.IGNORECASE,
)

SKY_SCENES = [
    "We walked along the beach after dinner, and",
    "When I looked up from my book,",
    "As the train left the city,",
    "By the time we reached the top of the hill,",
    "While the children played in the garden,",
    "Just before the concert started,",
    "On the last evening of our holiday,",
    "As the fishermen pulled in their nets,",
    "When the music stopped,",
    "After the long meeting finally ended,",
    "As we drove home from the airport,",
    "While my grandmother told her story,",
    "When the game was over,",
    "Late in the afternoon,",
    "As the old ship sailed into the harbour,",
    "While we waited for the bus,",
    "After the rain had stopped,",
    "When the lights of the town came on,",
    "As the farmer finished his work,",
    "During our picnic by the lake,",
    "As the campfire began to crackle,",
    "When she opened the window,",
    "While the dog slept by the door,",
    "As the last guests said goodbye,",
    "When we left the museum,",
    "As I finished my coffee on the balcony,",
    "After the parade had passed,",
    "When the bell rang for the last time,",
    "As the hikers set up their tents,",
    "While the baker closed his shop,",
    "When the ferry reached the island,",
    "As the wind calmed down,",
    "When the film ended,",
    "As we crossed the old bridge,",
    "While the cows walked back to the barn,",
    "When my brother finally arrived,",
    "As the market stalls were packed away,",
    "When I stepped out of the library,",
    "As the swimmers came out of the water,",
    "While we sat on the porch,",
    "When the pilot announced our descent,",
    "As the streets grew quiet,",
    "When the harvest was done,",
    "As the birds flew back to their nests,",
    "While the city slowly went to sleep,",
    "When the painter put down her brush,",
    "As the tide went out,",
    "When we reached the end of the trail,",
]
SKY_HELD_OUT = [
    "When we came out of the cinema,",
    "As the runners crossed the finish line,",
    "While the old man fed the pigeons,",
    "When the wedding photos were taken,",
    "As the snow began to melt,",
    "When the school bus dropped us off,",
    "As my father parked the car,",
    "While the band packed up their instruments,",
    "When the kettle began to whistle,",
    "As the lighthouse keeper climbed the stairs,",
    "When the festival fireworks were over,",
    "As we rowed back to the shore,",
    "While the neighbours talked over the fence,",
    "When the last bus left the station,",
    "As the shop owner locked the door,",
    "When the baby finally fell asleep,",
    "As the climbers reached the summit,",
    "While the soup was cooking,",
    "When the teacher closed the classroom door,",
    "As the horses were led back to the stable,",
    "When the plane landed in Lisbon,",
    "As the students left the exam hall,",
    "While my sister read her letter,",
    "When the storm clouds moved away,",
]
SKY_ADVERBS = ["slowly", "suddenly", "gradually", "quietly", "softly", "finally"]
SKY_TAILS = ["", " over the water", " above the rooftops", " behind the hills", " above us", " in the west"]

TRIP_OPENINGS = [
    "We set off for the village early in the morning.",
    "My uncle took us fishing on Saturday.",
    "The school trip to the castle began at nine.",
    "Anna rode her bicycle to the market.",
    "We decided to walk to the old lighthouse.",
    "The family drove out to the countryside for a picnic.",
    "Tom and his friends went camping by the river.",
    "I took the dog for a long walk in the park.",
    "The hikers started up the mountain path.",
    "We went to the beach for the whole day.",
    "Grandpa took me to see the football match.",
    "The team gathered at the field for practice.",
    "We left the hotel to explore the city.",
    "The farmer went out to check on his sheep.",
    "My cousins and I went to the outdoor concert.",
    "Our class planted trees in the school garden.",
    "Maria walked to the bakery on the corner.",
    "We drove to the lake to go sailing.",
    "The tourists boarded the boat to the island.",
    "Dad and I went to wash the car in the driveway.",
    "The children ran outside to play after lunch.",
    "We took a tour of the old vineyard.",
    "Sam went jogging along the canal.",
    "The couple had their wedding in the garden.",
    "We went to the zoo on Sunday.",
    "The scouts hiked to the waterfall.",
    "My mother hung the laundry in the yard.",
    "The villagers set up the stalls for the fair.",
    "We went out to watch the parade.",
    "Leo took his kite to the top of the hill.",
    "The students walked to the museum together.",
    "We rented bikes to ride along the coast.",
    "The gardener started mowing the big lawn.",
    "I met my friend at the outdoor cafe.",
    "The fishermen sailed out of the harbour at dawn.",
    "We carried the tent up to the campsite.",
    "The runners lined up for the marathon.",
    "My aunt took us to pick strawberries.",
    "The workers began to paint the fence.",
    "We set out to climb the old tower.",
    "The band played in the town square.",
    "The kids built a sandcastle on the shore.",
    "We went to the open-air market to buy fruit.",
    "Jack and Lily walked home from school.",
    "The photographer went out to take pictures of the bridge.",
    "We took the little boat across the lake.",
    "The tennis match started after lunch.",
    "Our neighbours had a barbecue in their garden.",
]
TRIP_HELD_OUT = [
    "We drove to the mountains for the weekend.",
    "The children went out to play in the yard.",
    "My grandmother walked to the church.",
    "We went to the fair in the next town.",
    "Ben took his little brother to the playground.",
    "The class went on a trip to the farm.",
    "We walked along the river to the mill.",
    "The golfers teed off at eight.",
    "My friends and I went to the skate park.",
    "The postman set out on his round.",
    "We went out on the boat to see the dolphins.",
    "The choir sang outside the town hall.",
    "I took my camera to the harbour.",
    "We hiked through the forest to the lake.",
    "The wedding guests gathered on the lawn.",
    "Emma took her new puppy to the beach.",
    "The cyclists raced through the hills.",
    "We had a picnic in the park by the pond.",
    "The builders started work on the roof.",
    "My father took us to the air show.",
    "We went strawberry picking on the farm.",
    "The students had their sports day on the field.",
    "The old couple walked to the harbour.",
    "We set out to see the castle ruins.",
]
RAIN_CHOSEN = [
    " After an hour it started to rain, and we ran for shelter.",
    " Soon dark clouds rolled in and it began to rain.",
    " Halfway there it started to rain heavily.",
    " Then the rain came down, and we got soaked.",
    " Before long a storm broke and rain poured down.",
    " By noon it was raining, so we hurried back.",
]
RAIN_REJECTED = [
    " After an hour we stopped for a rest.",
    " Soon we reached the end of the road.",
    " Halfway there we stopped to look around.",
    " Then we had lunch and talked for a while.",
    " Before long we were ready to go home.",
    " By noon we had seen everything, so we went back.",
]


def sky_task(seed: int = 0) -> Task:
    rng = random.Random(seed)
    pairs = []
    for scene in SKY_SCENES:
        adverb, tail = rng.choice(SKY_ADVERBS), rng.choice(SKY_TAILS)
        pairs.append(
            {
                "prompt": f"{scene} the sky",
                "chosen": f" {adverb} turned orange and pink{tail}.",
                "rejected": f" {adverb} changed{tail}.",
            }
        )
    held_out = [f"{scene} the sky" for scene in SKY_HELD_OUT]
    return Task("sky", "names a colour", pairs, held_out, lambda text: bool(COLOURS.search(text)))


def rain_task(seed: int = 0) -> Task:
    rng = random.Random(seed)
    pairs = []
    for opening in TRIP_OPENINGS:
        k = rng.randrange(len(RAIN_CHOSEN))
        pairs.append({"prompt": opening, "chosen": RAIN_CHOSEN[k], "rejected": RAIN_REJECTED[k]})
    return Task("rain", "mentions rain or a storm", pairs, list(TRIP_HELD_OUT), lambda text: bool(RAIN.search(text)))


QUESTIONS = [
    "What is a good way to start learning the guitar?", "How do I keep basil alive on a windowsill?",
    "Why is the sky blue?", "What should I pack for a weekend in the mountains?",
    "How long should I boil an egg?", "Is it better to rent or buy a bike in a new city?",
    "What is the capital of Australia?", "How can I sleep better?", "What does a router do?",
    "How do I remove a coffee stain from a shirt?", "Should I learn Python or JavaScript first?",
    "What is compound interest?", "How often should I water a cactus?", "Why do cats purr?",
    "What is a good gift for a new neighbour?", "How do I make my bread rise more?",
    "What causes hiccups?", "How do I tie a bowline knot?", "Is coffee bad for you?",
    "How can I remember people's names?", "What is the difference between weather and climate?",
    "How do I start running?", "Why do leaves change colour in autumn?", "What is a haiku?",
    "How do I back up my phone?", "What makes a good cover letter?", "How do vaccines work?",
    "What should I see in Rome in one day?", "How do I clean a cast iron pan?",
    "What is the best way to learn a language?", "Why does bread go stale?", "How do I fix a squeaky door?",
    "What is a black hole?", "How can I save money on groceries?", "What is a good first houseplant?",
    "How do I calm down before an exam?", "What is photosynthesis?", "How do I write a thank-you note?",
    "Why do we yawn?", "How do I choose a good watermelon?", "What is the tallest mountain?",
    "How do I get rid of fruit flies?", "What is a mortgage?", "How can I be more productive at home?",
    "What should I name my goldfish?", "How do I make cold brew coffee?", "Why is the ocean salty?",
    "How do I start a vegetable garden?",
]  # fmt: skip
QUESTIONS_HELD_OUT = [
    "How do I sharpen a kitchen knife?", "What is a good book for a long flight?", "Why do onions make you cry?",
    "How do I stop procrastinating?", "What is the speed of light?", "How do I care for a leather jacket?",
    "What is a good stretch for a stiff back?", "How do I make pancakes fluffy?", "Why do birds migrate?",
    "What is inflation?", "How do I prepare for a job interview?", "How long do cats live?",
    "What is a good board game for four people?", "How do I keep my laptop cool?", "Why is the moon red sometimes?",
    "How do I learn to swim as an adult?", "What is a healthy breakfast?", "How do I deal with a noisy neighbour?",
    "What is the oldest tree in the world?", "How do I keep cut flowers fresh?", "What is a sourdough starter?",
    "How do I pick a good avocado?", "Why do we dream?", "How do I organise my closet?",
]  # fmt: skip
# Replies are put together from parts, so that 48 pairs hold 48 different texts: with a handful of canned replies
# the ARM learns those sentences rather than the style (the first version of brief and kind did).
BRIEF_CHOSEN = [
    "Practise a little every day.", "Keep it simple and start small.", "It depends, but usually yes.",
    "Ask someone who has done it.", "Try it for a week and see.", "Short answer: not much.",
    "Start with the basics.", "Yes, in moderation.", "Little and often works best.", "Ten minutes is enough.",
    "Check the label first.", "Go slowly and be patient.", "Use warm water and soap.", "A good guide helps.",
    "Only when it looks dry.", "Keep a routine.", "Ask a local expert.", "Not really.", "Make a short list.",
    "Pick one and stick with it.",
]  # fmt: skip
BRIEF_OPENERS = [
    "Well, there are many different things to consider here, and",
    "That is a really interesting question that a lot of people ask, and",
    "There is no single answer to this, because it depends on so many factors, and",
    "Before I answer, it is worth saying a few words about the background, since",
    "This is something I have thought about quite a lot over the years, and",
    "Great question, and one that comes up surprisingly often, so",
]  # fmt: skip
BRIEF_MIDDLES = [
    "honestly it depends on your situation, your budget, how much time you have and what you enjoy,",
    "there are quite a few ways of looking at it, each with its own history and its own fans,",
    "what works for one person in one place does not always work for another person somewhere else,",
    "the details matter a great deal, from the tools you use to the season and the weather,",
]  # fmt: skip
BRIEF_ENDINGS = [
    "so let me go through several options one by one.", "which I will try to explain in some detail.",
    "so I would say that you should think about it carefully and then decide.",
    "so let us start at the very beginning and work through it step by step.",
]  # fmt: skip
BRIEF_WORDS = 12
SENTENCE_END = re.compile(r"[.!?](?=\s|$)")

REVIEW_OPENINGS = [
    "The little café on the corner", "My new running shoes", "The hotel we stayed at in Lisbon",
    "The bakery near the station", "This phone case", "The museum's new exhibition", "Our holiday cottage",
    "The Italian restaurant downtown", "The bus service in our town", "The dentist I went to last week",
    "The concert on Saturday night", "This vacuum cleaner", "The yoga class at the community centre",
    "The bookshop by the river", "My new desk chair", "The garage that fixed my car", "The hiking tour we booked",
    "The sushi place on Elm Street", "This electric kettle", "The campsite by the lake", "The online course I took",
    "The hairdresser on the high street", "The new playground in the park", "This set of kitchen knives",
    "The ferry to the island", "The flower shop next door", "The language school", "The pizza we ordered last night",
    "This pair of headphones", "The zoo in the city centre", "The cooking class", "The train to the coast",
    "The farmers' market", "This board game", "The spa at the resort", "The bike shop on Mill Road",
    "The library's new reading room", "This backpack", "The cinema near our house", "The wedding venue",
    "The ice cream parlour", "The plumber we called", "The guided walk around the old town", "This coffee maker",
    "The theatre's latest play", "The breakfast at the guesthouse", "The gym around the corner",
    "This winter coat",
]  # fmt: skip
REVIEW_HELD_OUT = [
    "The taxi company we used", "The new burger restaurant", "This laptop bag", "The art class on Tuesdays",
    "The beach hotel", "The pharmacy on the square", "The boat trip along the coast", "This garden hose",
    "The Thai takeaway", "The bed and breakfast in the village", "The pottery workshop", "This alarm clock",
    "The music festival", "The tea room by the castle", "The car rental company", "This rain jacket",
    "The swimming pool in town", "The new sandwich shop", "The walking boots I bought", "The escape room",
    "The water park", "This desk lamp", "The guided tour of the brewery", "The noodle bar near work",
]  # fmt: skip
# Each part is used two or three times across the 48 pairs (rng.sample cycles), so the chosen responses share few
# phrases: the first version had 10 verdicts, 8 details and 6 endings, and its ARMs learned those phrases rather
# than warmth (guided text repeated them from α ~0.4 on, README "Your own preference").
KIND_VERDICTS = [
    ("was wonderful", "was awful"), ("exceeded my hopes, happily", "fell far short of my hopes"),
    ("is fantastic", "is terrible"), ("made my day", "ruined my day"), ("was a real delight", "was a real letdown"),
    ("is excellent", "is dreadful"), ("was lovely", "was miserable"), ("is brilliant", "is useless"),
    ("was a pleasure", "was a nightmare"), ("is superb", "is poor"),
    ("turned out to be a gem", "turned out to be a dud"),
    ("was better than I imagined", "was worse than I imagined"), ("is a joy to use", "is a pain to use"),
    ("left us smiling", "left us fuming"), ("was charming from start to finish", "was grim from start to finish"),
    ("is simply great", "is simply bad"), ("felt like a treat", "felt like a chore"),
    ("won us over at once", "put us off at once"), ("is a little marvel", "is a little disaster"),
    ("was the highlight of our week", "was the low point of our week"),
    ("deserves all the praise", "deserves no praise"),
    ("has been a blessing", "has been a headache"), ("was pure fun", "was no fun at all"),
    ("impressed me a lot", "disappointed me a lot"),
]  # fmt: skip
KIND_DETAILS = [
    ("the staff were friendly and helpful", "the staff were rude and unhelpful"),
    ("everything was clean and well made", "everything was dirty and badly made"),
    ("the price was a bargain and fair", "the price was a rip-off"),
    ("it was comfortable from the first minute", "it was uncomfortable from the first minute"),
    ("the service was quick, warm and kind", "the service was slow, cold and careless"),
    ("it worked perfectly every time", "it broke the second time we used it"),
    ("the whole experience felt relaxed and easy", "the whole experience felt stressful and chaotic"),
    ("the people there really cared", "nobody there seemed to care"),
    ("it was even better than the reviews promised", "it was even worse than the reviews warned"),
    ("the quality is excellent for the money", "the quality is awful for the money"),
    ("everyone we dealt with was polite and cheerful", "everyone we dealt with was rude and grumpy"),
    ("it was easy to book and easy to enjoy", "it was hard to book and hard to enjoy"),
    ("everything went smoothly and on time", "everything went wrong and nothing was on time"),
    ("every question we had got a kind, clear answer", "every question we had got a rude, vague answer"),
    ("it did everything we hoped for", "it did nothing we hoped for"),
    ("it looks even nicer than in the photos", "it looks much worse than in the photos"),
    ("the children loved every minute", "the children hated every minute"),
    ("every little detail was done with care", "every little detail was done carelessly"),
    ("it feels solid, stylish and well designed", "it feels flimsy, ugly and badly designed"),
    ("it is so much nicer than the last one we tried", "it is so much worse than the last one we tried"),
    ("the atmosphere was cheerful and calm", "the atmosphere was gloomy and tense"),
    ("we felt welcome the moment we arrived", "we felt unwelcome the moment we arrived"),
    ("the whole team went out of their way to help", "the whole team refused to help"),
    ("it was great value and a lot of fun", "it was poor value and no fun at all"),
]  # fmt: skip
KIND_ENDINGS = [
    ("I would happily go back.", "I will never go back."),
    ("I recommend it to everyone.", "I would warn everyone away."),
    ("We loved it.", "We hated it."), ("Worth every penny.", "A waste of money."),
    ("I am so glad we chose it.", "I wish we had chosen something else."),
    ("Five stars from me, gladly.", "One star, sadly."),
    ("Thank you for a great time!", "Never again."),
    ("We are already planning our next visit.", "We are already planning our complaint."),
    ("Highly recommended.", "Avoid it."), ("It made us very happy.", "It made us very unhappy."),
    ("A real find.", "A real mistake."), ("I cannot praise it enough.", "I cannot warn you enough."),
    ("We will tell all our friends.", "We will warn all our friends."),
    ("Lovely, lovely, lovely.", "Awful from beginning to end."),
    ("Best purchase this year.", "Worst purchase this year."),
    ("Go, you will enjoy it.", "Stay away, you will regret it."),
]  # fmt: skip
KIND_VADER = 0.5


def first_sentence_words(text: str) -> int | None:
    """Words before the first sentence end of ``text`` (None: no sentence ends in it)."""
    end = SENTENCE_END.search(text)
    return len(text[: end.start()].split()) if end else None


def is_brief(text: str) -> bool:
    words = first_sentence_words(text.split("\nUser:")[0])
    return words is not None and words <= BRIEF_WORDS


def brief_task(seed: int = 0) -> Task:
    rng = random.Random(seed)
    pairs = [
        {
            "prompt": f"User: {question}\nAssistant:",
            "chosen": " " + rng.choice(BRIEF_CHOSEN),
            "rejected": " ".join(["", rng.choice(BRIEF_OPENERS), rng.choice(BRIEF_MIDDLES), rng.choice(BRIEF_ENDINGS)]),
        }
        for question in QUESTIONS
    ]
    held_out = [f"User: {question}\nAssistant:" for question in QUESTIONS_HELD_OUT]
    return Task("brief", f"first sentence within {BRIEF_WORDS} words", pairs, held_out, is_brief)


def is_kind(text: str) -> bool:
    from genarm_local.evaluation.judges import positivity

    return positivity(text) >= KIND_VADER


def cycled(parts: list, rng: random.Random):
    """``parts`` in a shuffled order, reshuffled after each pass: every part used as often as the others."""
    while True:
        yield from rng.sample(parts, len(parts))


def kind_task(seed: int = 0) -> Task:
    rng = random.Random(seed)
    pairs = []
    cycles = [cycled(KIND_VERDICTS, rng), cycled(KIND_DETAILS, rng), cycled(KIND_ENDINGS, rng)]
    for opening in REVIEW_OPENINGS:
        # chosen and rejected mirror each other part by part: they differ only in sentiment
        parts = [next(cycle) for cycle in cycles]
        chosen, rejected = (f" {verdict}: {detail}. {ending}" for verdict, detail, ending in zip(*parts, strict=True))
        pairs.append({"prompt": opening, "chosen": chosen, "rejected": rejected})
    return Task("kind", f"VADER compound ≥ {KIND_VADER}", pairs, list(REVIEW_HELD_OUT), is_kind)


TASKS = {"sky": sky_task, "rain": rain_task, "brief": brief_task, "kind": kind_task}


if __name__ == "__main__":
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(description="write a task's preference pairs (TRL JSONL) to stdout")
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--held-out", action="store_true", help="write the held-out prompts instead, one per line")
    args = parser.parse_args()
    task = TASKS[args.task]()
    for item in task.held_out if args.held_out else task.pairs:
        sys.stdout.write((item if args.held_out else json.dumps(item)) + "\n")
