// sum: placeholder, to be written
#pragma once
